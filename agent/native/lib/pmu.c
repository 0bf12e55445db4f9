// SPDX-License-Identifier: GPL-2.0
/*
 * Per-vendor PMU tables.  MSR numbers: Intel SDM Vol. 4 (IA32_PERFEVTSELx 0x186, IA32_PMCx
 * 0x4c1, IA32_PERFCTRx 0xc1, IA32_FIXED_CTRx 0x309, IA32_FIXED_CTR_CTRL 0x38d,
 * IA32_PERF_GLOBAL_STATUS/CTRL/OVF_CTRL/STATUS_SET 0x38e-0x391); AMD APM Vol. 2 §13.2 and the
 * kernel's msr-index.h (MSR_F15H_PERF_CTL0 0xc0010200 / CTR0 0xc0010201, stride 2;
 * PerfCntrGlobalStatus/Ctl/StatusClr/StatusSet 0xc0000300-0xc0000303).
 */
#include <cpuid.h>
#include <errno.h>
#include <linux/kvm.h>
#include <stdlib.h>
#include <string.h>

#include "pmu.h"
#include "pmu_events.h"

#define EVENT_ENTRY(n, sel, um) { #n, sel, um },
#define NAME_ENTRY(n) #n,

static const struct pmu_event intel_events[] = { INTEL_ARCH_EVENTS(EVENT_ENTRY) };
static const char *const intel_fixed[] = { INTEL_FIXED_EVENTS(NAME_ENTRY) };
static const struct pmu_event amd_events[] = { AMD_EVENTS(EVENT_ENTRY) };
static const struct pmu_event intel_mem_events[] = { INTEL_MEM_EVENTS(EVENT_ENTRY) };
static const struct pmu_event amd_mem_events[] = { AMD_MEM_EVENTS(EVENT_ENTRY) };

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

static int leaf(const struct cpuid_view *v, uint32_t l, uint32_t s, uint32_t r[4])
{
	memset(r, 0, 4 * sizeof(r[0]));
	return v->get(v, l, s, r);
}

static void intel_decode(const struct cpuid_view *v, struct pmu_info *p)
{
	uint32_t r[4], max;
	uint32_t len;

	memset(p, 0, sizeof(*p));
	if (leaf(v, 0, 0, r) < 0)
		return;
	max = r[0];
	if (leaf(v, 1, 0, r) == 0)
		p->pdcm = r[2] >> 15 & 1;
	if (max >= 7 && leaf(v, 7, 0, r) == 0)
		p->hybrid = r[3] >> 15 & 1;
	if (max < 0xa || leaf(v, 0xa, 0, r) < 0)
		return;
	p->version = r[0] & 0xff;
	if (!p->version)
		return;
	p->gp = r[0] >> 8 & 0xff;
	p->gp_width = r[0] >> 16 & 0xff;
	len = r[0] >> 24 & 0xff;
	if (len > ARRAY_SIZE(intel_events))
		len = ARRAY_SIZE(intel_events);
	/* EBX bit set = event NOT available. */
	p->events_mask = ~r[1] & (len >= 32 ? ~0u : (1u << len) - 1);
	if (p->version >= 2) {
		uint32_t n = r[3] & 0x1f;

		p->fixed_contig = (int)n;
		p->fixed_ecx = r[2];
		/* v5: ECX is a bitmap of fixed counters, on top of the first EDX[4:0]. */
		p->fixed_mask = (n >= 32 ? ~0u : (1u << n) - 1) | (p->version >= 5 ? r[2] : 0);
		p->fixed_mask &= (1u << ARRAY_SIZE(intel_fixed)) - 1;
		p->fixed = p->fixed_mask ? 32 - __builtin_clz(p->fixed_mask) : 0;
		p->fixed_width = r[3] >> 5 & 0xff;
	}
	p->has_global = p->version >= 2;
	p->has_status_set = p->version >= 4;
}

static void amd_decode(const struct cpuid_view *v, struct pmu_info *p)
{
	uint32_t r[4], max = 0;

	memset(p, 0, sizeof(*p));
	if (leaf(v, 0x80000000, 0, r) == 0)
		max = r[0];
	if (max >= 0x80000001 && leaf(v, 0x80000001, 0, r) == 0)
		p->perfctr_core = r[2] >> 23 & 1;
	if (max >= 0x80000022 && leaf(v, 0x80000022, 0, r) == 0)
		p->perfmon_v2 = r[0] & 1;
	/*
	 * Counter count: PerfMonV2 enumerates it; PerfCtrExtCore means 6.  Without either we report
	 * 0 rather than assume the legacy K7 four: every Zen has PerfCtrExtCore, so its absence means
	 * the hypervisor exposes no PMU (as on the farm's PMU-less machines).
	 */
	p->amd_core_counters = p->perfmon_v2 ? (int)(r[1] & 0xf) : p->perfctr_core ? 6 : 0;
	p->gp = p->amd_core_counters;
	p->version = p->perfmon_v2 ? 2 : p->perfctr_core ? 1 : 0;
	p->gp_width = p->gp ? 48 : 0;
	p->events_mask = p->gp ? (1u << ARRAY_SIZE(amd_events)) - 1 : 0;
	p->has_global = p->perfmon_v2;
	p->has_status_set = p->perfmon_v2;
}

/* The entry (fn, idx) of a KVM CPUID table, appended (zeroed) if absent and add is set. */
static struct kvm_cpuid_entry2 *table_entry(struct kvm_cpuid2 **t, uint32_t fn, uint32_t idx, bool add)
{
	struct kvm_cpuid2 *n;

	for (uint32_t i = 0; i < (*t)->nent; i++) {
		struct kvm_cpuid_entry2 *e = &(*t)->entries[i];

		if (e->function == fn && (!(e->flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) || e->index == idx))
			return e;
	}
	if (!add)
		return NULL;
	n = realloc(*t, sizeof(*n) + ((*t)->nent + 1) * sizeof(n->entries[0]));
	if (!n)
		return NULL;
	*t = n;
	memset(&n->entries[n->nent], 0, sizeof(n->entries[0]));
	n->entries[n->nent].function = fn;
	n->entries[n->nent].index = idx;
	return &n->entries[n->nent++];
}

/*
 * Intel leaf 0xA, as the selftests set X86_PROPERTY_PMU_* (include/x86/processor.h): EAX =
 * version | GP count << 8 | GP width << 16 | EBX length << 24; EBX = unavailable events; ECX =
 * v5 fixed bitmap; EDX = contiguous fixed count | fixed width << 5.  No PMU: the leaf is zero and
 * PDCM (CPUID.1:ECX[15]) is clear.
 */
static int intel_encode(struct kvm_cpuid2 **t, const struct pmu_info *p, bool no_pmu)
{
	struct kvm_cpuid_entry2 *e = table_entry(t, 0xa, 0, true);
	struct kvm_cpuid_entry2 *one;
	uint32_t len = p->events_mask ? 32 - (uint32_t)__builtin_clz(p->events_mask) : 0;

	if (!e)
		return ENOMEM;
	if (no_pmu || p->version <= 0) {
		e->eax = e->ebx = e->ecx = e->edx = 0;
	} else {
		e->eax = ((uint32_t)p->version & 0xff) | ((uint32_t)p->gp & 0xff) << 8 |
			 ((uint32_t)p->gp_width & 0xff) << 16 | len << 24;
		e->ebx = ~p->events_mask & (len >= 32 ? ~0u : (1u << len) - 1);
		if (p->ebx_forced) {
			e->eax = (e->eax & 0x00ffffffu) | (p->ebx_length & 0xff) << 24;
			e->ebx = p->ebx;
		}
		e->ecx = p->fixed_ecx;
		e->edx = (e->edx & ~0x1fffu) | ((uint32_t)p->fixed_contig & 0x1f) |
			 ((uint32_t)p->fixed_width & 0xff) << 5;
	}
	/* PDCM (CPUID.1:ECX[15]) as the PMU says: vmx_pmu_caps_test.c clears it on its own. */
	one = table_entry(t, 1, 0, false);
	if (one)
		one->ecx = (one->ecx & ~(1u << 15)) | (!no_pmu && p->pdcm ? 1u << 15 : 0);
	return 0;
}

/*
 * AMD: PerfCtrExtCore (0x80000001:ECX[23]) for version >= 1, PerfMonV2 (0x80000022:EAX[0]) with
 * the counter count in EBX[3:0] for version 2 -- what amd_pmu_refresh() reads back.
 */
static int amd_encode(struct kvm_cpuid2 **t, const struct pmu_info *p, bool no_pmu)
{
	int v = no_pmu ? 0 : p->version;
	struct kvm_cpuid_entry2 *ext = table_entry(t, 0x80000001, 0, true), *max, *v2;

	if (!ext)
		return ENOMEM;
	ext->ecx = (ext->ecx & ~(1u << 23)) | (v >= 1 ? 1u << 23 : 0);
	v2 = table_entry(t, 0x80000022, 0, v >= 2);
	if (v >= 2 && !v2)
		return ENOMEM;
	if (v2) {
		v2->eax = (v2->eax & ~1u) | (v >= 2 ? 1u : 0);
		v2->ebx = (v2->ebx & ~0xfu) | (v >= 2 ? (uint32_t)p->gp & 0xf : 0);
	}
	max = table_entry(t, 0x80000000, 0, true);
	if (!max)
		return ENOMEM;
	if (v >= 2 && max->eax < 0x80000022)
		max->eax = 0x80000022;
	return 0;
}

/*
 * PEBS, DS and LBR MSRs: the mediated vPMU exposes neither PEBS nor LBR (vmx_get_perf_capabilities
 * clears the formats when enable_mediated_pmu), so each must #GP.  MSR numbers: SDM Vol. 4
 * (IA32_PEBS_ENABLE 0x3f1, IA32_DS_AREA 0x600, MSR_LBR_SELECT 0x1c8, MSR_LBR_TOS 0x1c9,
 * MSR_LBR_NHM_FROM 0x680, IA32_ARCH_LBR_CTL 0x14ce); AMD MSR_AMD64_LBR_SELECT 0xc000010e.
 */
static const struct guard_msr intel_guards[] = {
	{ "pebs_enable", true, 0x3f1, 1 },
	{ "ds_area", true, 0x600, 0x200000 },
	{ "lbr_select", false, 0x1c8, 0 },
	{ "lbr_tos", false, 0x1c9, 0 },
	{ "lbr_from0", false, 0x680, 0 },
	{ "arch_lbr_ctl", false, 0x14ce, 0 },
};
static const struct guard_msr amd_guards[] = {
	{ "amd_lbr_select", false, 0xc000010e, 0 },
};

/* pmu_event_filter_test.c test_cases, in order: (mask, match, exclude) on the memory select. */
static const struct masked_case intel_masked[MASKED_CASES] = {
	{ 1, { { 0xff, 0x81, false } } },
	{ 1, { { 0xff, 0x82, false } } },
	{ 1, { { 0xff, 0x83, false } } },
	{ 2, { { 0x7c, 0, false }, { 0xff, 0x83, true } } },
	{ 2, { { 0x7c, 0, false }, { 0xff, 0x82, true } } },
	{ 1, { { 0xfe, 0x82, false } } },
	{ 1, { { 0x7c, 0, false } } },
};
static const struct masked_case amd_masked[MASKED_CASES] = {
	{ 1, { { 0xff, 0x01, false } } },
	{ 1, { { 0xff, 0x02, false } } },
	{ 1, { { 0xff, 0x04, false } } },
	{ 1, { { 0xfc, 0, false } } },
	{ 2, { { 0xf8, 0, false }, { 0xff, 0x02, true } } },
	{ 2, { { 0xf8, 0, false }, { 0xff, 0x01, true } } },
	{ 1, { { 0xf8, 0, false } } },
};

const struct pmu_layout intel_layout = {
	.vendor = "intel", .vendor_id = "GenuineIntel", .kvm_module = "kvm_intel",
	.sel_base = 0x186, .ctr_base = 0x4c1, .stride = 1, .max_gp = 8,
	.sel_name = "IA32_PERFEVTSEL", .ctr_name = "IA32_PMC",
	.legacy_ctr_base = 0xc1, .legacy_ctr_name = "IA32_PERFCTR", .p6_quirk_count = 2,
	.fixed_base = 0x309, .fixed_ctrl = 0x38d, .rdpmc_fixed_flag = 1u << 30,
	.fixed_name = "IA32_FIXED_CTR",
	.global_status = 0x38e, .global_ctrl = 0x38f, .global_status_clr = 0x390,
	.global_status_set = 0x391, .perf_capabilities = MSR_IA32_PERF_CAPABILITIES,
	.events = intel_events, .nevents = ARRAY_SIZE(intel_events),
	.fixed_events = intel_fixed, .nfixed_events = ARRAY_SIZE(intel_fixed),
	.decode = intel_decode, .encode = intel_encode,
	.mem_events = intel_mem_events, .masked_cases = intel_masked,
	.guards = intel_guards, .nguards = ARRAY_SIZE(intel_guards),
};

const struct pmu_layout amd_layout = {
	.vendor = "amd", .vendor_id = "AuthenticAMD", .kvm_module = "kvm_amd",
	.sel_base = 0xc0010200, .ctr_base = 0xc0010201, .stride = 2, .max_gp = 6,
	.sel_name = "MSR_F15H_PERF_CTL", .ctr_name = "MSR_F15H_PERF_CTR",
	.global_status = 0xc0000300, .global_ctrl = 0xc0000301, .global_status_clr = 0xc0000302,
	.global_status_set = 0xc0000303,
	.events = amd_events, .nevents = ARRAY_SIZE(amd_events),
	.decode = amd_decode, .encode = amd_encode,
	.k7_sel_base = 0xc0010000, .k7_ctr_base = 0xc0010004, .k7_count = 4,
	.guest_only = 1ULL << 40, .host_only = 1ULL << 41,
	.mem_events = amd_mem_events, .masked_cases = amd_masked,
	.guards = amd_guards, .nguards = ARRAY_SIZE(amd_guards),
};

const struct pmu_layout *pmu_layout_for(const char *vendor_id)
{
	static const struct pmu_layout *const all[] = { &intel_layout, &amd_layout };

	for (size_t i = 0; i < ARRAY_SIZE(all); i++)
		if (!strcmp(all[i]->vendor_id, vendor_id))
			return all[i];
	return NULL;
}

const struct pmu_event *pmu_event(const struct pmu_layout *l, const char *name)
{
	for (size_t i = 0; i < l->nevents; i++)
		if (!strcmp(l->events[i].name, name))
			return &l->events[i];
	return NULL;
}

uint64_t pmu_selector(const struct pmu_event *e, uint64_t extra)
{
	return (e->select & 0xffULL) | ((uint64_t)(e->select >> 8) << 32) |
	       ((uint64_t)e->umask << 8) | EVTSEL_OS | EVTSEL_USR | extra;
}

uint64_t pmu_filter_key(const struct pmu_event *e)
{
	return (e->select & 0xffULL) | ((uint64_t)(e->select >> 8) << 32) | ((uint64_t)e->umask << 8);
}

uint32_t pmu_sel_msr(const struct pmu_layout *l, int i)
{
	return l->sel_base + l->stride * (uint32_t)i;
}

uint32_t pmu_ctr_msr(const struct pmu_layout *l, int i)
{
	return l->ctr_base + l->stride * (uint32_t)i;
}

uint64_t pmu_global_mask(const struct pmu_info *p, bool with_fixed)
{
	uint64_t m = width_mask(p->gp);

	if (with_fixed)
		m |= (uint64_t)p->fixed_mask << 32;
	return m;
}

static int host_get(const struct cpuid_view *v, uint32_t l, uint32_t s, uint32_t r[4])
{
	(void)v;
	__cpuid_count(l, s, r[0], r[1], r[2], r[3]);
	return 0;
}

const struct cpuid_view host_cpuid_view = { .get = host_get };

static int kvm_get(const struct cpuid_view *v, uint32_t l, uint32_t s, uint32_t r[4])
{
	const struct kvm_cpuid2 *t = v->table;

	for (uint32_t i = 0; t && i < t->nent; i++) {
		const struct kvm_cpuid_entry2 *e = &t->entries[i];

		if (e->function != l)
			continue;
		if ((e->flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) && e->index != s)
			continue;
		r[0] = e->eax;
		r[1] = e->ebx;
		r[2] = e->ecx;
		r[3] = e->edx;
		return 0;
	}
	return -1;
}

struct cpuid_view kvm_cpuid_view(const struct kvm_cpuid2 *table)
{
	return (struct cpuid_view){ .get = kvm_get, .table = table };
}

void cpuid_vendor(const struct cpuid_view *v, char out[13])
{
	uint32_t r[4] = { 0 };

	memset(out, 0, 13);
	if (v->get(v, 0, 0, r) < 0)
		return;
	memcpy(out, &r[1], 4);
	memcpy(out + 4, &r[3], 4);
	memcpy(out + 8, &r[2], 4);
}
