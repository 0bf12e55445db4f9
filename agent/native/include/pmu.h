/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Per-vendor PMU register tables and CPUID decoding.  Everything that differs between Intel and
 * AMD lives in one `struct pmu_layout` per vendor (lib/pmu.c); probes never test the vendor.
 */
#ifndef PMUFARM_PMU_H
#define PMUFARM_PMU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Event-select bits (same positions on Intel and AMD). */
#define EVTSEL_USR   (1ULL << 16)
#define EVTSEL_OS    (1ULL << 17)
#define EVTSEL_INT   (1ULL << 20)
#define EVTSEL_ANY   (1ULL << 21)   /* Intel AnyThread; reserved for a mediated guest, and on AMD */
#define EVTSEL_EN    (1ULL << 22)
#define EVTSEL_CMASK_SHIFT 24
#define FIXED_CTRL_ANY  0x4ULL
/* IA32_FIXED_CTR_CTRL: 4 bits per counter. */
#define FIXED_CTRL_OS   0x1ULL
#define FIXED_CTRL_USR  0x2ULL
#define FIXED_CTRL_PMI  0x8ULL
#define RDPMC_FAST      (1U << 31)   /* Intel "fast" RDPMC (low 32 bits only) */

struct kvm_cpuid2;

struct pmu_event {
	const char *name;
	uint16_t select;
	uint8_t umask;
};

/* One CPUID view: the host's (the CPUID instruction) or KVM's supported table. */
struct cpuid_view {
	/* 0 and regs filled, or -1 if the leaf is absent. */
	int (*get)(const struct cpuid_view *v, uint32_t leaf, uint32_t sub, uint32_t regs[4]);
	const void *table;   /* struct kvm_cpuid2 * for the KVM view */
};

/* The PMU a CPUID view enumerates. */
struct pmu_info {
	int version;            /* Intel CPUID.0AH:EAX[7:0]; AMD: 2 PerfMonV2, 1 PerfCtrExtCore, 0 none */
	int gp;                 /* general-purpose counters */
	int gp_width;
	int fixed;              /* number of fixed counters (highest supported index + 1) */
	int fixed_contig;       /* Intel: CPUID.0AH:EDX[4:0], the contiguous fixed counters */
	uint32_t fixed_ecx;     /* Intel: CPUID.0AH:ECX, the v5 supported-fixed bitmap (as written) */
	int fixed_width;
	uint32_t fixed_mask;    /* supported fixed counters */
	uint32_t events_mask;   /* bit i: layout->events[i] available */
	bool pdcm;              /* Intel: IA32_PERF_CAPABILITIES exists */
	/* Intel encode only: write CPUID.0AH EAX[31:24] and EBX as given instead of deriving them from
	 * events_mask (probe arch_events' EBX length / unavailable-mask combinations). */
	bool ebx_forced;
	uint32_t ebx_length, ebx;
	bool hybrid;            /* Intel: CPUID.07H:EDX[15] */
	bool perfctr_core;      /* AMD: CPUID 0x80000001 ECX[23] */
	bool perfmon_v2;        /* AMD: CPUID 0x80000022 EAX[0] */
	int amd_core_counters;  /* AMD: counters from 0x80000022 EBX[3:0] (v2), else 6 / 0 */
	bool has_global;        /* GLOBAL_CTRL/STATUS usable: Intel v2+, AMD PerfMonV2 */
	bool has_status_set;    /* GLOBAL_STATUS_SET: Intel v4+, AMD PerfMonV2 */
};

/* An MSR access that must #GP in a mediated guest (probe guards). */
struct guard_msr {
	const char *name;       /* the case name in the observations */
	bool write;
	uint32_t msr;
	uint64_t value;         /* written */
};

/* One upstream masked-event case: up to two entries on the layout's memory event select. */
struct masked_case {
	int n;
	struct { uint8_t mask, match; bool exclude; } e[2];
};
#define MASKED_CASES 7

struct pmu_layout {
	const char *vendor;             /* "intel" | "amd" */
	const char *vendor_id;          /* CPUID.0 string */
	const char *kvm_module;         /* module exposing enable_mediated_pmu */
	/* general-purpose counters: MSR = base + stride * i */
	uint32_t sel_base, ctr_base, stride, max_gp;
	const char *sel_name, *ctr_name;
	uint32_t legacy_ctr_base;       /* Intel IA32_PERFCTRx, 32-bit writes; 0 = none */
	const char *legacy_ctr_name;
	uint32_t p6_quirk_count;        /* Intel: MSR_P6_PERFCTR0/1 read 0 / drop writes when absent */
	/* fixed counters (0 = none) */
	uint32_t fixed_base, fixed_ctrl, rdpmc_fixed_flag;
	const char *fixed_name;
	/* global registers (0 = none) */
	uint32_t global_status, global_ctrl, global_status_clr, global_status_set;
	uint32_t perf_capabilities;     /* Intel IA32_PERF_CAPABILITIES */
	const struct pmu_event *events; /* Intel: CPUID.0AH:EBX order */
	size_t nevents;
	const char *const *fixed_events;
	size_t nfixed_events;
	void (*decode)(const struct cpuid_view *v, struct pmu_info *out);
	/* The inverse of decode: write p into a KVM CPUID table (entries added as needed); 0 or ENOMEM. */
	int (*encode)(struct kvm_cpuid2 **t, const struct pmu_info *p, bool no_pmu);
	/* Further MSRs the probes touch (0 = the vendor has none). */
	uint32_t k7_sel_base, k7_ctr_base, k7_count;   /* AMD legacy PERFEVTSEL0-3 / PERFCTR0-3 */
	const struct pmu_event *mem_events;            /* loads, stores, loads+stores (masked-event tests) */
	const struct masked_case *masked_cases;        /* MASKED_CASES, pmu_event_filter_test.c order */
	uint64_t guest_only, host_only;                /* AMD EVTSEL Guest-Only (40) / Host-Only (41) */
	const struct guard_msr *guards;                /* vendor MSRs a mediated guest must not reach */
	size_t nguards;
};

#define MSR_IA32_PERF_CAPABILITIES 0x345
#define PERF_CAP_FW_WRITES         (1ULL << 13)

extern const struct pmu_layout intel_layout, amd_layout;

/* The layout for a CPUID vendor string, or NULL. */
const struct pmu_layout *pmu_layout_for(const char *vendor_id);
/* Event by name in a layout's table; NULL if the vendor has no such event. */
const struct pmu_event *pmu_event(const struct pmu_layout *l, const char *name);
/* Event-select value: event, umask, OS+USR, plus `extra` (EVTSEL_EN, EVTSEL_INT). */
uint64_t pmu_selector(const struct pmu_event *e, uint64_t extra);
/* KVM_SET_PMU_EVENT_FILTER key for an event (select | umask << 8, select[11:8] at [35:32]). */
uint64_t pmu_filter_key(const struct pmu_event *e);
uint32_t pmu_sel_msr(const struct pmu_layout *l, int i);
uint32_t pmu_ctr_msr(const struct pmu_layout *l, int i);
/* Mask of the GP enable bits (and fixed ones at 32+j) in GLOBAL_CTRL. */
uint64_t pmu_global_mask(const struct pmu_info *p, bool with_fixed);
static inline uint64_t width_mask(int width)
{
	return width >= 64 ? ~0ULL : width <= 0 ? 0 : (1ULL << width) - 1;
}

/* CPUID views. */
extern const struct cpuid_view host_cpuid_view;
struct kvm_cpuid2;
struct cpuid_view kvm_cpuid_view(const struct kvm_cpuid2 *table);
void cpuid_vendor(const struct cpuid_view *v, char out[13]);

#endif
