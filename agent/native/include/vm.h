/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Minimal KVM VMM: 64-bit long-mode VMs with an in-kernel irqchip (the mediated vPMU needs the
 * in-kernel LAPIC), identity-mapped memory, the guest program from guest/ and a batch interface
 * to its command interpreter (include/guest_abi.h).
 */
#ifndef PMUFARM_VM_H
#define PMUFARM_VM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "guest_abi.h"
#include "pmu.h"

#define VM_ERR_LEN 512

enum irqchip_mode {
	IRQCHIP_DEFAULT = 0, /* PMUFARM_IRQCHIP=split|full|none, else split */
	IRQCHIP_SPLIT,       /* KVM_CAP_SPLIT_IRQCHIP: in-kernel LAPIC, PIC/IOAPIC left to us */
	IRQCHIP_FULL,        /* KVM_CREATE_IRQCHIP: in-kernel LAPIC + PIC + IOAPIC */
	IRQCHIP_NONE,        /* no in-kernel LAPIC: KVM silently disables the vPMU */
};

/*
 * Either in-kernel irqchip satisfies the mediated vPMU (irqchip_in_kernel(): LVTPC delivery by
 * the in-kernel LAPIC).  Split is the default because tearing down the full one costs an SRCU
 * grace period per PIC/IOAPIC device (~13 ms per VM on the farm's nested hosts) and we need
 * neither.
 */
struct vm_opts {
	bool irqchip;       /* in-kernel LAPIC (irqchip_mode); true for every probe */
	enum irqchip_mode irqchip_mode;
	bool pmu_disable;   /* KVM_CAP_PMU_CAPABILITY(KVM_PMU_CAP_DISABLE) before any vCPU */
	const struct guest_pmu_cfg *guest;  /* NULL: KVM's supported CPUID unchanged */
};

/*
 * The guest's PMU as the VMM sets it, like the KVM selftests (pmu_counters_test.c
 * pmu_vm_create_with_one_vcpu(): CPUID properties set by the test, PERF_CAPABILITIES by a
 * host-initiated vcpu_set_msr() before the first KVM_RUN).  KVM never edits CPUID itself, not even
 * for a PMU-disabled VM (api.rst, KVM_CAP_PMU_CAPABILITY), so no_pmu clears the PMU leaves here.
 */
struct guest_pmu_cfg {
	const struct pmu_layout *layout;    /* whose CPUID encoding (lib/pmu.c encode) */
	struct pmu_info pmu;                /* what the guest CPUID enumerates */
	bool no_pmu;                        /* no PMU at all (Intel: leaf 0xA zero, PDCM clear) */
	int64_t perf_capabilities;          /* Intel: host KVM_SET_MSRS before KVM_RUN; -1 = KVM's default */
};

struct vcpu;

struct vm {
	int kvm_fd;
	int fd;
	uint8_t *mem;
	size_t mem_size;
	int run_size;
	int pmu_cap_errno;          /* errno of the PMU_CAPABILITY enable (0 = ok), -1 = not tried */
	enum irqchip_mode irqchip;  /* what was created */
	struct vcpu *vcpus[GUEST_MAX_VCPUS];
	int nvcpus;
	struct kvm_cpuid2 *cpuid;   /* KVM_GET_SUPPORTED_CPUID shaped by opts.guest, for every vCPU */
	struct guest_pmu_cfg guest; /* copy of opts.guest (layout NULL: none) */
	void *epmu;                 /* lib/epmu.c state; NULL unless the PMU is emulated */
	char err[VM_ERR_LEN];
};

struct vcpu {
	struct vm *vm;
	int fd;
	int id;
	struct kvm_run *run;
	struct guest_area *area;    /* host view of the guest's mailbox */
	bool booted;
	void *epmu;                 /* lib/epmu.c per-vCPU state; NULL unless the PMU is emulated */
};

/* What the host saw while a batch ran. */
struct run_stats {
	uint64_t exits;      /* KVM_RUN returns */
	uint64_t ticks;      /* PORT_TICK exits */
	uint64_t tick_sum;   /* sum of the values carried by the ticks */
};

/* 0 on success; -1 with vm->err set. */
int vm_create(struct vm *vm, const struct vm_opts *opts);
void vm_destroy(struct vm *vm);
/* KVM_ENABLE_CAP(KVM_CAP_PMU_CAPABILITY, KVM_PMU_CAP_DISABLE): 0 or the errno. */
int vm_pmu_cap_disable(struct vm *vm);
/* 0 with *out set, or the errno of the failing step (KVM_CREATE_VCPU, ...) with vm->err set. */
int vcpu_add(struct vm *vm, int id, struct vcpu **out);

/* Batches: begin, add commands (pointers stay valid until the next begin), run. */
void batch_begin(struct vcpu *v);
struct guest_cmd *batch_add(struct vcpu *v, uint32_t op, uint64_t a0, uint64_t a1, uint64_t a2,
			    uint64_t a3, uint64_t a4);
/* 0 once the guest reported PORT_DONE; -1 with vm->err set.  stats may be NULL. */
int batch_run(struct vcpu *v, struct run_stats *stats);

/* Shorthands for the common ops. */
static inline struct guest_cmd *g_rdmsr(struct vcpu *v, uint32_t msr)
{
	return batch_add(v, OP_RDMSR, msr, 0, 0, 0, 0);
}
static inline struct guest_cmd *g_wrmsr(struct vcpu *v, uint32_t msr, uint64_t val)
{
	return batch_add(v, OP_WRMSR, msr, val, 0, 0, 0);
}
static inline struct guest_cmd *g_rdpmc(struct vcpu *v, uint32_t idx)
{
	return batch_add(v, OP_RDPMC, idx, 0, 0, 0, 0);
}

/* Host-initiated MSR access on a vCPU (KVM_GET_MSRS / KVM_SET_MSRS): 0 or an errno (EINVAL: refused). */
int vcpu_get_msr(struct vcpu *v, uint32_t msr, uint64_t *val);
int vcpu_set_msr(struct vcpu *v, uint32_t msr, uint64_t val);

/*
 * The one place the harness learns what KVM offers: KVM_GET_SUPPORTED_CPUID (caller frees) and
 * KVM's feature MSRs (KVM_GET_MSRS on /dev/kvm, e.g. the default PERF_CAPABILITIES).  An emulated
 * PMU overrides what the harness believes here.  NULL / errno with err set.
 */
struct kvm_cpuid2 *kvm_supported_cpuid(int kvm_fd, char *err, size_t len);
int kvm_feature_msr(int kvm_fd, uint32_t msr, uint64_t *val);

/* Guest exceptions recorded since the vCPU was created (the first GUEST_MAX_EXC). */
const struct guest_exc *vcpu_exception(const struct vcpu *v, uint32_t i);
uint32_t vcpu_nexc(const struct vcpu *v);

const char *irqchip_name(enum irqchip_mode m);

/* Pin the calling thread to one CPU (sched_setaffinity); 0 or errno. */
int pin_to_cpu(int cpu);

#endif
