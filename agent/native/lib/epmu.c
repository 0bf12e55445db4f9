// SPDX-License-Identifier: GPL-2.0
/*
 * The emulated PMU (include/epmu.h): KVM's guest-visible PMU rules, implemented in the VMM.
 *
 * Every rule below follows KVM (arch/x86/kvm/pmu.c, vmx/pmu_intel.c, svm/pmu.c) as read upstream;
 * the comment next to each names the function.  What it cannot know (hardware events other than
 * instructions and branches) it does not count: those counters stay where the guest put them.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "caps.h"
#include "epmu.h"
#include "pmu.h"
#include "pmu_events.h"
#include "vm.h"

#ifdef HAVE_CAPSTONE
#include <capstone/capstone.h>
#endif

extern const char guest_blob_start[], guest_blob_end[];

/* Masked events arrived in Linux 6.3; the build host's headers may predate them. */
#ifndef KVM_PMU_EVENT_FLAG_MASKED_EVENTS
#define KVM_PMU_EVENT_FLAG_MASKED_EVENTS (1U << 0)
#endif
#define SEL_EDGE  (1ULL << 18)
#define SEL_INV   (1ULL << 23)
#define SEL_CMASK (0xffULL << 24)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MAX_GP    8
#define MAX_FIXED 8
#define MAX_RDPMC_SITES 4
#define LAPIC_LVTPC 0x340
#define LVT_MASKED (1U << 16)
#define LVT_DM_NMI (4U << 8)

/* ---- one register table per vendor ----------------------------------------------------------- */

struct msr_range {
	uint32_t base, count;
};

struct epmu_regs {
	const struct pmu_layout *l;
	uint32_t k7_sel, k7_ctr, k7_count;  /* AMD legacy PERFEVTSEL0-3/PERFCTR0-3, aliases of 0-3 */
	uint32_t p6_sel, p6_ctr, p6_count;  /* Intel MSR_P6_EVNTSEL0/1, MSR_P6_PERFCTR0/1 */
	uint64_t sel_rsvd;                  /* reserved event-select bits */
	bool sel_rsvd_gp;                   /* Intel: #GP on a reserved bit; AMD: dropped */
	bool beyond_width_gp;               /* full-width counter write above the width: #GP (Intel) */
	uint64_t status_extra;              /* GLOBAL_STATUS bits beyond the counters (Intel 62, 63) */
	uint32_t insn_select, br_select;    /* the two events counted (select | umask << 8) */
	bool lvtpc_mask_on_pmi;             /* Intel: the LAPIC masks LVTPC when it delivers a PMI */
	uint64_t filter_event_mask;         /* kvm_pmu_ops.EVENTSEL_EVENT: Intel 7:0, AMD 7:0 + 35:32 */
	struct msr_range filter[6];         /* MSR ranges routed to userspace */
};

/*
 * Intel: intel_pmu_refresh() reserved_bits 0xffffffff00200000 (63:32 and 21); set_msr #GPs on
 * them and on full-width (MSR_IA32_PMC0) writes above pmc_bitmask(); legacy PERFCTRx writes are
 * sign-extended from bit 31.  kvm_apic_local_deliver() masks LVTPC on Intel-compatible guests.
 */
static const struct epmu_regs intel_regs = {
	.l = &intel_layout, .p6_sel = 0x186, .p6_ctr = 0xc1, .p6_count = 2,
	.sel_rsvd = 0xffffffff00200000ULL, .sel_rsvd_gp = true, .beyond_width_gp = true,
	.status_extra = 3ULL << 62, .insn_select = 0xc0, .br_select = 0xc4,
	.lvtpc_mask_on_pmi = true, .filter_event_mask = 0xff,
	.filter = { { 0xc1, 8 }, { 0x186, 8 }, { 0x309, 8 }, { 0x345, 1 }, { 0x38d, 6 }, { 0x4c1, 16 } },
};

/*
 * AMD: amd_pmu_refresh() reserved_bits 0xfffffff000280000 (63:36, 21, 19), which amd_pmu_set_msr()
 * silently drops; counters take any value masked to the width (no #GP); get_gp_pmc_amd() maps
 * the K7 MSRs to counters 0-3 and the F15H pairs only with PERFCTR_CORE.
 */
static const struct epmu_regs amd_regs = {
	.l = &amd_layout, .k7_sel = 0xc0010000, .k7_ctr = 0xc0010004, .k7_count = 4,
	.sel_rsvd = 0xfffffff000280000ULL, .insn_select = 0xc0, .br_select = 0xc2,
	.filter_event_mask = 0xf000000ffULL,
	.filter = { { 0xc0010000, 8 }, { 0xc0010200, 16 }, { 0xc0000300, 4 } },
};

/* ---- emulated hosts (layouts) ---------------------------------------------------------------- */

struct epmu_host {
	const char *name;
	const struct epmu_regs *r;
	uint32_t signature;                 /* CPUID.1:EAX */
	/* host CPUID */
	int version, gp, gp_width, fixed_width;
	uint32_t fixed_mask, nevents, events_mask;
	uint64_t perf_caps;                 /* Intel IA32_PERF_CAPABILITIES */
	/* KVM_GET_SUPPORTED_CPUID */
	int kvm_version;
	uint32_t kvm_fixed_mask;
};

/*
 * intel: a Sapphire-Rapids-like host (v5, 8 GP, 4 fixed, FW_WRITES) as KVM 7.0 exposes it:
 * kvm_init_pmu_capability() still clamps the version to 2 and KVM_MAX_NR_INTEL_FIXED_COUNTERS is
 * 3 (vpmu.md 1.3).  intel-v5: the same host with the version passed through (later kernels),
 * fixed counters enumerated by the v5 CPUID.0AH:ECX bitmap.  amd: a Zen 4 host with PerfMonV2
 * and 6 core counters (amd_pmu_refresh(): version 2, nr_arch_gp_counters from 0x80000022 EBX).
 */
static const struct epmu_host hosts[] = {
	{ "intel", &intel_regs, 0x000806f8, 5, 8, 48, 48, 0xf, 8, 0xff, 0x2000, 2, 0x7 },
	{ "intel-v5", &intel_regs, 0x000806f8, 5, 8, 48, 48, 0xf, 8, 0xff, 0x2000, 5, 0x7 },
	{ "amd", &amd_regs, 0x00a10f11, 2, 6, 48, 0, 0, 4, 0xf, 0, 2, 0 },
};

/* ---- faults and errata ----------------------------------------------------------------------- */

enum {
	F_NOT_STOPPED, F_STALE, F_LEAK, F_FILTER_IGNORED, F_BITMAP_IGNORED, F_UPDATE_NOT_APPLIED,
	F_PMI_LOST, F_GLOBAL_NOT_RESTORED, F_WRONG_WIDTH, F_UNEXPOSED, F_COUNT,
};
/* The ids of inventory/faults.yaml that have an MSR-level form here. */
static const char *const fault_names[F_COUNT] = {
	"counters_not_stopped_at_exit", "stale_counters_new_vm", "cross_context_leak", "filter_ignored",
	"fixed_bitmap_ignored", "filter_update_not_applied", "pmi_lost", "global_ctrl_not_restored",
	"wrong_counter_width", "unexposed_counters_accessible",
};
enum { E_INSN_PER_EXIT, E_BR_PER_EXIT, E_VMRUN_BRANCH, E_COUNT };
/* Errata symptom classes (contracts 6) the emulated host can show. */
static const char *const erratum_names[E_COUNT] = {
	"insn_overcount_on_vm_transition", "branch_overcount_on_vm_transition", "vmrun_counted_as_branch",
};
/* counters_not_stopped_at_exit: host work counted per exit (fixed, so runs are reproducible). */
#define HOST_INSNS_PER_EXIT    3000
#define HOST_BRANCHES_PER_EXIT 400

/* ---- state ----------------------------------------------------------------------------------- */

struct epmu_state {
	uint64_t sel[MAX_GP];       /* what the guest wrote (and reads back) */
	bool sel_allowed[MAX_GP];   /* filter verdict at write time (filter_update_not_applied) */
	uint64_t ctr[MAX_GP];
	uint64_t fixed[MAX_FIXED];
	uint64_t fixed_ctrl, global_ctrl, global_status;
};

struct epmu_filter {
	bool set;
	uint32_t action, flags, fixed_bitmap, nevents;
	uint64_t *events;
};

struct epmu_vm {
	struct vm *vm;
	bool pmu_disabled;
	struct epmu_filter filter;
};

struct epmu_vcpu {
	struct pmu_info pmu;        /* the guest's PMU, from its CPUID and the host's limits */
	bool pdcm, fw_writes;
	bool has_run;               /* KVM_RUN happened: feature MSRs are frozen */
	uint64_t perf_caps;
	struct epmu_state own, *st;
	/* stepping: the counters live at the last instruction boundary */
	bool stepping;
	uint64_t prev_rip;
	int prev_cpl;
	uint64_t active_insn, active_br;    /* counters counting instructions / branches (bit 32+j: fixed) */
	bool pmi_pending;
	struct kvm_guest_debug dbg;
	uint32_t nsites;
	uint64_t sites[MAX_RDPMC_SITES];
};

static const struct epmu_host *host;
static bool resolved;
static bool trace;          /* PMUFARM_EPMU_TRACE=1: every emulated MSR access on stderr */
static bool faults[F_COUNT], errata[E_COUNT];
static char bad_item[96];
static struct epmu_state leftover;  /* stale_counters_new_vm: the last destroyed vCPU's registers */
static bool have_leftover;
static struct epmu_state shared;    /* cross_context_leak: one register file for every context */
static struct epmu_vm *vms[16];     /* by VM fd, for the event-filter ioctl */

#ifdef HAVE_CAPSTONE
static csh cs;
static bool cs_ready;
#endif

static int parse_list(const char *env, const char *const *names, int n, bool *out)
{
	const char *s = getenv(env);

	while (s && *s) {
		size_t len = strcspn(s, ",");
		int i;

		for (i = 0; i < n; i++)
			if (strlen(names[i]) == len && !strncmp(names[i], s, len))
				break;
		if (len && i == n) {
			snprintf(bad_item, sizeof(bad_item), "%s: unknown '%.*s'", env, (int)(len > 60 ? 60 : len), s);
			return -1;
		}
		if (len)
			out[i] = true;
		s += len + (s[len] == ',');
	}
	return 0;
}

static void resolve(void)
{
	const char *name = getenv(EPMU_ENV);

	if (resolved)
		return;
	resolved = true;
	trace = getenv("PMUFARM_EPMU_TRACE") && !strcmp(getenv("PMUFARM_EPMU_TRACE"), "1");
	for (size_t i = 0; name && i < ARRAY_SIZE(hosts); i++)
		if (!strcmp(hosts[i].name, name))
			host = &hosts[i];
	if (parse_list(EPMU_ENV_FAULTS, fault_names, F_COUNT, faults) == 0)
		parse_list(EPMU_ENV_ERRATA, erratum_names, E_COUNT, errata);
}

bool epmu_active(void)
{
	const char *name = getenv(EPMU_ENV);

	return name && *name;
}

const char *epmu_layout_names(void)
{
	return "intel, intel-v5, amd";
}

int epmu_check(char *err, size_t len)
{
	resolve();
	if (!host) {
		snprintf(err, len, "%s='%s' is not an emulated PMU layout (known: %s)", EPMU_ENV,
			 getenv(EPMU_ENV) ? getenv(EPMU_ENV) : "", epmu_layout_names());
		return -1;
	}
	if (bad_item[0]) {
		snprintf(err, len, "%s", bad_item);
		return -1;
	}
#ifndef HAVE_CAPSTONE
	snprintf(err, len, "the emulated PMU needs libcapstone to recognise branches: install Debian "
		 "libcapstone-dev and rebuild agent/native (make -C agent/native)");
	return -1;
#else
	if (!cs_ready) {
		if (cs_open(CS_ARCH_X86, CS_MODE_64, &cs) != CS_ERR_OK ||
		    cs_option(cs, CS_OPT_DETAIL, CS_OPT_ON) != CS_ERR_OK) {
			snprintf(err, len, "libcapstone: cs_open failed");
			return -1;
		}
		cs_ready = true;
	}
	return 0;
#endif
}

const char *epmu_probe_unsupported(const char *probe)
{
	if (!strcmp(probe, "host_excludes_guest") || !strcmp(probe, "exclusivity"))
		return "needs a host PMU: the emulated PMU lives in the VMM, so host perf events and "
		       "KVM's perf/mediated-PMU exclusion are not there to observe";
	return NULL;
}

static bool usable(void)
{
	char err[256];

	return epmu_active() && epmu_check(err, sizeof(err)) == 0;
}

/* ---- CPUID ----------------------------------------------------------------------------------- */

static struct kvm_cpuid_entry2 *leaf_entry(struct kvm_cpuid2 **tp, uint32_t fn, uint32_t idx, bool add)
{
	struct kvm_cpuid2 *t = *tp;

	for (uint32_t i = 0; i < t->nent; i++)
		if (t->entries[i].function == fn && t->entries[i].index == idx)
			return &t->entries[i];
	if (!add)
		return NULL;
	t = realloc(t, sizeof(*t) + (t->nent + 1) * sizeof(t->entries[0]));
	if (!t)
		return NULL;
	*tp = t;
	memset(&t->entries[t->nent], 0, sizeof(t->entries[0]));
	t->entries[t->nent].function = fn;
	t->entries[t->nent].index = idx;
	return &t->entries[t->nent++];
}

static void drop_leaf(struct kvm_cpuid2 *t, uint32_t fn)
{
	uint32_t o = 0;

	for (uint32_t i = 0; i < t->nent; i++)
		if (t->entries[i].function != fn)
			t->entries[o++] = t->entries[i];
	t->nent = o;
}

/* Write the PMU leaves of `h` into a CPUID table: the host's (kvm=false) or KVM's view. */
static int shape_cpuid(struct kvm_cpuid2 **tp, bool kvm)
{
	const struct epmu_host *h = host;
	bool intel = h->r->l == &intel_layout;
	const char *vid = h->r->l->vendor_id;
	int version = kvm ? h->kvm_version : h->version;
	uint32_t fmask = kvm ? h->kvm_fixed_mask : h->fixed_mask;
	struct kvm_cpuid_entry2 *e;
	uint32_t nfixed = 0;

	if (!(e = leaf_entry(tp, 0, 0, true)))
		return ENOMEM;
	if (e->eax < 0xa)
		e->eax = 0xa;
	memcpy(&e->ebx, vid, 4);
	memcpy(&e->edx, vid + 4, 4);
	memcpy(&e->ecx, vid + 8, 4);
	if (!(e = leaf_entry(tp, 1, 0, true)))
		return ENOMEM;
	e->eax = h->signature;
	e->ecx = (e->ecx & ~(1U << 15)) | (intel ? 1U << 15 : 0);     /* PDCM */
	if ((e = leaf_entry(tp, 7, 0, false)))
		e->edx &= ~(1U << 15);                                  /* not hybrid */
	if (!(e = leaf_entry(tp, 0xa, 0, true)))
		return ENOMEM;
	memset(&e->eax, 0, 4 * sizeof(e->eax));
	if (intel) {
		while (nfixed < 32 && fmask >> nfixed & 1)
			nfixed++;
		e->eax = (uint32_t)version | (uint32_t)h->gp << 8 | (uint32_t)h->gp_width << 16 |
			 h->nevents << 24;
		e->ebx = ~h->events_mask & ((1U << h->nevents) - 1);
		/* cpuid.c __do_cpuid_func() leaf 0xa: KVM reports ECX (the v5 fixed bitmap) as 0. */
		e->ecx = !kvm && version >= 5 ? fmask : 0;
		e->edx = nfixed | (uint32_t)h->fixed_width << 5;
	}
	if (!(e = leaf_entry(tp, 0x80000000, 0, true)))
		return ENOMEM;
	if (!intel && e->eax < 0x80000022)
		e->eax = 0x80000022;
	memcpy(&e->ebx, vid, 4);
	memcpy(&e->edx, vid + 4, 4);
	memcpy(&e->ecx, vid + 8, 4);
	if (!(e = leaf_entry(tp, 0x80000001, 0, true)))
		return ENOMEM;
	e->ecx = (e->ecx & ~(1U << 23)) | (intel ? 0 : 1U << 23);     /* PerfCtrExtCore */
	if (intel) {
		drop_leaf(*tp, 0x80000022);
	} else {
		if (!(e = leaf_entry(tp, 0x80000022, 0, true)))
			return ENOMEM;
		e->eax = version >= 2 ? 1 : 0;                          /* PerfMonV2 */
		e->ebx = (uint32_t)h->gp;
		e->ecx = e->edx = 0;
	}
	return 0;
}

int epmu_supported_cpuid(struct kvm_cpuid2 **table)
{
	if (!usable() || !*table)
		return 0;
	return shape_cpuid(table, true);
}

void epmu_caps(struct host_caps *c)
{
	char err[256];
	struct kvm_cpuid2 *t;

	if (!epmu_active())
		return;
	if (epmu_check(err, sizeof(err))) {
		if (c->nreasons < CAPS_MAX_REASONS)
			snprintf(c->reasons[c->nreasons++], CAPS_REASON_LEN, "emulated PMU: %.150s", err);
		return;
	}
	/* The emulated PMU plays the host: its CPUID, its PERF_CAPABILITIES, a mediated-capable KVM. */
	t = calloc(1, sizeof(*t));
	if (t && shape_cpuid(&t, false) == 0) {
		struct cpuid_view hv = kvm_cpuid_view(t);

		host->r->l->decode(&hv, &c->host_pmu);
	}
	free(t);
	snprintf(c->vendor_id, sizeof(c->vendor_id), "%s", host->r->l->vendor_id);
	c->layout = host->r->l;
	c->family = (int)(host->signature >> 8 & 0xf);
	c->model = (int)(host->signature >> 4 & 0xf);
	if (c->family == 0xf)
		c->family += (int)(host->signature >> 20 & 0xff);
	if (c->family >= 6)
		c->model |= (int)(host->signature >> 16 & 0xf) << 4;
	c->stepping = (int)(host->signature & 0xf);
	c->perf_capabilities = host->r->l == &intel_layout ? (int64_t)host->perf_caps : -1;
	c->enable_pmu = 1;
	c->enable_mediated_pmu = 1;
	c->vendor_module_loaded = true;
	c->cap_pmu_capability = KVM_PMU_CAP_DISABLE;   /* kvm_vm_ioctl_check_extension() with enable_pmu */
	c->nmi_watchdog = 0;    /* the emulated host's perf holds no counter */
	c->vcpu_errno = 0;
	if (c->kvm_cpuid && shape_cpuid(&c->kvm_cpuid, true) == 0) {
		struct cpuid_view kv = kvm_cpuid_view(c->kvm_cpuid);

		c->layout->decode(&kv, &c->kvm_pmu);
	}
}

/* ---- VM -------------------------------------------------------------------------------------- */

static struct epmu_vm *vm_state(int fd)
{
	for (size_t i = 0; i < ARRAY_SIZE(vms); i++)
		if (vms[i] && vms[i]->vm->fd == fd)
			return vms[i];
	return NULL;
}

__attribute__((format(printf, 2, 3)))
static int vm_fail(struct vm *vm, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(vm->err, sizeof(vm->err), fmt, ap);
	va_end(ap);
	return -1;
}

int epmu_vm_init(struct vm *vm)
{
	static uint8_t deny[64];    /* all-zero bitmap: every MSR of the range is denied */
	struct kvm_msr_filter f = { .flags = KVM_MSR_FILTER_DEFAULT_ALLOW };
	struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR,
		.args = { KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL } };
	char err[256];
	struct epmu_vm *ev;
	size_t slot;

	if (!epmu_active())
		return 0;
	if (epmu_check(err, sizeof(err)))
		return vm_fail(vm, "emulated PMU: %s", err);
	if (ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS) <= 0)
		return vm_fail(vm, "emulated PMU: KVM_CAP_SYNC_REGS is not available");
	/*
	 * Deny the PMU ranges so that every guest access exits here: without the filter KVM answers
	 * some of them itself (kvm_get_msr_common(): MSR_P6_PERFCTR0/1, MSR_K7_* read 0).
	 */
	for (size_t i = 0; i < ARRAY_SIZE(host->r->filter) && host->r->filter[i].count; i++) {
		f.ranges[i].flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE;
		f.ranges[i].base = host->r->filter[i].base;
		f.ranges[i].nmsrs = host->r->filter[i].count;
		f.ranges[i].bitmap = deny;
	}
	if (ioctl(vm->fd, KVM_ENABLE_CAP, &cap) < 0)
		return vm_fail(vm, "emulated PMU: KVM_CAP_X86_USER_SPACE_MSR: %s", strerror(errno));
	if (ioctl(vm->fd, KVM_X86_SET_MSR_FILTER, &f) < 0)
		return vm_fail(vm, "emulated PMU: KVM_X86_SET_MSR_FILTER: %s", strerror(errno));
	for (slot = 0; slot < ARRAY_SIZE(vms) && vms[slot]; slot++)
		;
	if (slot == ARRAY_SIZE(vms))
		return vm_fail(vm, "emulated PMU: more than %zu VMs at once", ARRAY_SIZE(vms));
	ev = calloc(1, sizeof(*ev));
	if (!ev)
		return vm_fail(vm, "out of memory");
	ev->vm = vm;
	vms[slot] = ev;
	vm->epmu = ev;
	return 0;
}

int epmu_vm_pmu_disable(struct vm *vm)
{
	struct epmu_vm *ev = vm->epmu;

	/* kvm_vm_ioctl_enable_cap(KVM_CAP_PMU_CAPABILITY): only before the first vCPU. */
	if (!ev || vm->nvcpus)
		return EINVAL;
	ev->pmu_disabled = true;
	return 0;
}

void epmu_vm_destroy(struct vm *vm)
{
	struct epmu_vm *ev = vm->epmu;

	for (int i = 0; i < vm->nvcpus; i++) {
		struct epmu_vcpu *e = vm->vcpus[i]->epmu;

		if (e && i == 0 && faults[F_STALE]) {
			leftover = *e->st;
			have_leftover = true;
		}
		free(e);
		vm->vcpus[i]->epmu = NULL;
	}
	if (!ev)
		return;
	for (size_t i = 0; i < ARRAY_SIZE(vms); i++)
		if (vms[i] == ev)
			vms[i] = NULL;
	free(ev->filter.events);
	free(ev);
	vm->epmu = NULL;
}

/*
 * The emulated PMU must apply exactly the filter KVM accepted (KVM validates it, and has no GET
 * ioctl), so the VMM's ioctl() is wrapped at link time (-Wl,--wrap=ioctl) and keeps a copy of
 * every successful KVM_SET_PMU_EVENT_FILTER.  Every other request passes straight through.
 */
int __real_ioctl(int fd, unsigned long req, ...);
int __wrap_ioctl(int fd, unsigned long req, ...);

int __wrap_ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	void *arg;
	int ret;

	va_start(ap, req);
	arg = va_arg(ap, void *);
	va_end(ap);
	ret = __real_ioctl(fd, req, arg);
	if (ret == 0 && req == KVM_SET_PMU_EVENT_FILTER) {
		const struct kvm_pmu_event_filter *in = arg;
		struct epmu_vm *ev = vm_state(fd);
		uint64_t *copy = NULL;

		if (!ev)
			return ret;
		if (in->nevents) {
			copy = malloc(in->nevents * sizeof(*copy));
			if (!copy) {
				errno = ENOMEM;
				return -1;
			}
			memcpy(copy, in->events, in->nevents * sizeof(*copy));
		}
		free(ev->filter.events);
		ev->filter = (struct epmu_filter){ .set = true, .action = in->action, .flags = in->flags,
			.fixed_bitmap = in->fixed_counter_bitmap, .nevents = in->nevents, .events = copy };
	}
	return ret;
}

/* ---- the event filter (kvm/pmu.c) ------------------------------------------------------------ */

/*
 * is_gp_event_allowed(): allowed iff (some include matches and no exclude matches) == (action is
 * ALLOW).  Plain entries are converted to masked entries matching the exact unit mask
 * (convert_to_masked_filter()); a masked entry matches when its event select is equal and
 * (umask & mask) == match.
 */
static bool gp_allowed(const struct epmu_filter *f, const struct epmu_regs *r, uint64_t sel)
{
	uint32_t ev = (uint32_t)(sel & 0xff) | (r == &amd_regs ? (uint32_t)(sel >> 24 & 0xf00) : 0);
	uint8_t umask = (uint8_t)(sel >> 8);
	bool inc = false, exc = false;

	if (!f->set || faults[F_FILTER_IGNORED])
		return true;
	for (uint32_t i = 0; i < f->nevents; i++) {
		uint64_t e = f->events[i];
		uint32_t e_ev = (uint32_t)(e & 0xff) | (uint32_t)(e >> 24 & 0xf00);
		uint8_t mask = 0xff, match = (uint8_t)(e >> 8);
		bool exclude = false;

		if (f->flags & KVM_PMU_EVENT_FLAG_MASKED_EVENTS) {
			mask = (uint8_t)(e >> 56);
			exclude = e >> 55 & 1;
		} else if (e & ~(r->filter_event_mask | 0xff00ULL)) {
			continue;   /* prepare_filter_lists() drops plain entries with other bits */
		}
		if (e_ev != ev || (umask & mask) != match)
			continue;
		if (exclude)
			exc = true;
		else
			inc = true;
	}
	return (inc && !exc) == (f->action == KVM_PMU_EVENT_ALLOW);
}

/* is_fixed_event_allowed(): only fixed_counter_bitmap decides for fixed counters. */
static bool fixed_allowed(const struct epmu_filter *f, int j)
{
	bool bit;

	if (!f->set || faults[F_BITMAP_IGNORED])
		return true;
	bit = f->fixed_bitmap >> j & 1;
	if (f->action == KVM_PMU_EVENT_DENY && bit)
		return false;
	if (f->action == KVM_PMU_EVENT_ALLOW && !bit)
		return false;
	return true;
}

/* ---- vCPU ------------------------------------------------------------------------------------ */

static const struct epmu_filter no_filter;

static const struct epmu_filter *filter_of(struct vcpu *v)
{
	struct epmu_vm *ev = v->vm->epmu;

	return ev ? &ev->filter : &no_filter;
}

static uint64_t gp_mask(const struct epmu_vcpu *e)
{
	return width_mask(faults[F_WRONG_WIDTH] ? 32 : e->pmu.gp_width);
}

static uint64_t fixed_mask_w(const struct epmu_vcpu *e)
{
	return width_mask(faults[F_WRONG_WIDTH] ? 32 : e->pmu.fixed_width);
}

static uint64_t global_ctrl_valid(const struct epmu_vcpu *e)
{
	return width_mask(e->pmu.gp) | (uint64_t)e->pmu.fixed_mask << 32;
}

/* Derive the guest PMU from the CPUID set on the vCPU, as kvm_pmu_refresh() does. */
static void refresh(struct vcpu *v, struct epmu_vcpu *e, const struct kvm_cpuid2 *set)
{
	struct cpuid_view gv = kvm_cpuid_view(set);
	const struct epmu_host *h = host;
	struct epmu_vm *ev = v->vm->epmu;
	struct pmu_info *p = &e->pmu;

	h->r->l->decode(&gv, p);
	e->pdcm = p->pdcm;
	if (ev && ev->pmu_disabled) {
		/* kvm_pmu_refresh(): !kvm->arch.enable_pmu leaves version 0, whatever CPUID says. */
		memset(p, 0, sizeof(*p));
		return;
	}
	/*
	 * Counts and widths are clamped to what the (emulated) host supports, the version is not on
	 * Intel: intel_pmu_refresh() takes pmu->version = eax.split.version_id from the guest's
	 * CPUID as is, so a v4 guest on a host KVM reports as v2 has GLOBAL_STATUS_SET (below).
	 * amd_pmu_refresh() derives 1 or 2 from the guest's PERFMON_V2 cap, which KVM masks.
	 */
	if (h->r->l != &intel_layout && p->version > h->kvm_version)
		p->version = h->kvm_version;
	if (p->gp > h->gp)
		p->gp = h->gp;
	if (p->gp > (int)h->r->l->max_gp)
		p->gp = (int)h->r->l->max_gp;
	if (p->gp_width > h->gp_width)
		p->gp_width = h->gp_width;
	p->fixed_mask &= h->kvm_fixed_mask;
	p->fixed = p->fixed_mask ? 32 - __builtin_clz(p->fixed_mask) : 0;
	if (p->fixed_width > h->fixed_width)
		p->fixed_width = h->fixed_width;
	if (!p->version) {
		memset(p, 0, sizeof(*p));
		return;
	}
	p->has_global = p->version >= 2;
	/* intel_is_valid_msr(): GLOBAL_STATUS_SET only with pmu->version >= 4 (the guest's); AMD: PerfMonV2. */
	p->has_status_set = p->version >= (h->r->l == &intel_layout ? 4 : 2);
	/* vmx_get_perf_capabilities() under the mediated PMU: full-width writes, no LBR/PEBS. */
	e->perf_caps = e->pdcm ? h->perf_caps : 0;
	e->fw_writes = h->r->l != &intel_layout || (e->perf_caps & PERF_CAP_FW_WRITES);
}

static void debug_set(struct vcpu *v, struct epmu_vcpu *e, bool step)
{
	e->dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | (step ? KVM_GUESTDBG_SINGLESTEP : 0);
	e->stepping = step;
	ioctl(v->fd, KVM_SET_GUEST_DEBUG, &e->dbg);
}

#ifdef HAVE_CAPSTONE
/* Decode one guest instruction: its length (0 if undecodable), and whether it is a branch. */
static int decode(struct vcpu *v, uint64_t rip, bool *branch, unsigned int *id)
{
	static struct { uint8_t len, br; uint16_t id; } cache[GUEST_CODE_MAX];
	uint64_t off = rip - GUEST_CODE;
	cs_insn *insn;
	size_t n;
	int len = 0;

	if (rip >= GUEST_CODE && off < GUEST_CODE_MAX && cache[off].len) {
		*branch = cache[off].br;
		*id = cache[off].id;
		return cache[off].len;
	}
	*branch = false;
	*id = 0;
	if (rip + 16 > v->vm->mem_size)
		return 0;
	n = cs_disasm(cs, v->vm->mem + rip, 16, rip, 1, &insn);
	if (n == 1) {
		len = insn->size;
		*id = insn->id;
		/* Retired branches: every control transfer (jumps, calls, returns, far and software ints). */
		*branch = cs_insn_group(cs, insn, CS_GRP_JUMP) || cs_insn_group(cs, insn, CS_GRP_CALL) ||
			  cs_insn_group(cs, insn, CS_GRP_RET) || cs_insn_group(cs, insn, CS_GRP_IRET) ||
			  cs_insn_group(cs, insn, CS_GRP_INT);
		cs_free(insn, n);
		if (rip >= GUEST_CODE && off < GUEST_CODE_MAX) {
			cache[off].len = (uint8_t)len;
			cache[off].br = *branch;
			cache[off].id = (uint16_t)*id;
		}
	}
	return len;
}

/* Every RDPMC of the guest program gets a hardware execute breakpoint: KVM #GPs RDPMC itself. */
static void find_rdpmc_sites(struct epmu_vcpu *e)
{
	size_t size = (size_t)(guest_blob_end - guest_blob_start);
	const uint8_t *code = (const uint8_t *)guest_blob_start;
	uint64_t addr = GUEST_CODE;
	cs_insn *insn = cs_malloc(cs);

	if (!insn)
		return;
	/* Linear sweep: the blob is code then data; a bogus site in data is never executed. */
	while (size && e->nsites < MAX_RDPMC_SITES) {
		if (!cs_disasm_iter(cs, &code, &size, &addr, insn)) {
			code++;
			size--;
			addr++;
			continue;
		}
		if (insn->id == X86_INS_RDPMC)
			e->sites[e->nsites++] = insn->address;
	}
	cs_free(insn, 1);
}
#endif

int epmu_vcpu_init(struct vcpu *v)
{
	struct kvm_cpuid2 *set;
	struct epmu_vcpu *e;
	int nent = 256;

	if (!epmu_active() || !v->vm->epmu)
		return 0;
	e = calloc(1, sizeof(*e));
	if (!e)
		return ENOMEM;
	v->epmu = e;
	set = calloc(1, sizeof(*set) + (size_t)nent * sizeof(set->entries[0]));
	if (!set)
		return ENOMEM;
	set->nent = (uint32_t)nent;
	if (ioctl(v->fd, KVM_GET_CPUID2, set) < 0) {
		int err = errno;

		free(set);
		return err;
	}
	refresh(v, e, set);
	free(set);

	e->st = faults[F_LEAK] ? &shared : &e->own;
	if (faults[F_STALE] && have_leftover)
		e->own = leftover;
	/* kvm_pmu_refresh(): every GP enable bit of GLOBAL_CTRL is set at RESET (v2+). */
	if (e->pmu.has_global && !(faults[F_STALE] && have_leftover) && e->st == &e->own)
		e->st->global_ctrl = width_mask(e->pmu.gp);
	for (int i = 0; i < MAX_GP; i++)
		e->own.sel_allowed[i] = true;

	v->run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
#ifdef HAVE_CAPSTONE
	find_rdpmc_sites(e);
#endif
	for (uint32_t i = 0; i < e->nsites; i++) {
		e->dbg.arch.debugreg[i] = e->sites[i];
		e->dbg.arch.debugreg[7] |= 1ULL << (2 * i);     /* Li, execute, 1 byte */
	}
	debug_set(v, e, false);
	return 0;
}

/* ---- counting -------------------------------------------------------------------------------- */

/* USR counts at CPL > 0, OS at CPL 0; event select and unit mask must match exactly. */
static bool sel_counts(uint64_t sel, uint32_t select, int cpl)
{
	/* EDGE, INV and CMASK count cycles meeting a per-cycle threshold: not modelled. */
	if (sel & (SEL_EDGE | SEL_INV | SEL_CMASK))
		return false;
	uint32_t ev = (uint32_t)(sel & 0xffff) | (host->r == &amd_regs ? (uint32_t)(sel >> 32 & 0xf) << 16 : 0);
	uint64_t ring = cpl ? EVTSEL_USR : EVTSEL_OS;

	return ev == select && (sel & ring);
}

/* Which counters count instructions / branches at `cpl` now (eventsel_hw: the filter clears ENABLE). */
static void live(struct vcpu *v, const struct epmu_vcpu *e, int cpl, uint64_t *insn, uint64_t *br)
{
	const struct epmu_filter *f = filter_of(v);
	const struct epmu_state *s = e->st;
	uint64_t on = e->pmu.has_global ? s->global_ctrl : ~0ULL;

	*insn = *br = 0;
	for (int i = 0; i < e->pmu.gp; i++) {
		uint64_t sel = s->sel[i];
		bool allowed = faults[F_UPDATE_NOT_APPLIED] ? s->sel_allowed[i] : gp_allowed(f, host->r, sel);

		if (!(sel & EVTSEL_EN) || !(on >> i & 1) || !allowed)
			continue;
		if (sel_counts(sel, host->r->insn_select, cpl))
			*insn |= 1ULL << i;
		if (sel_counts(sel, host->r->br_select, cpl))
			*br |= 1ULL << i;
	}
	/* Fixed counter 0 counts instructions; the others count events not modelled here. */
	if (e->pmu.fixed_mask & 1 && on >> 32 & 1 && fixed_allowed(f, 0) &&
	    (s->fixed_ctrl & (cpl ? FIXED_CTRL_USR : FIXED_CTRL_OS)))
		*insn |= 1ULL << 32;
}

/* Would anything count at some CPL?  Then every instruction must be seen. */
static bool want_steps(struct vcpu *v, const struct epmu_vcpu *e)
{
	uint64_t a, b, c, d;

	live(v, e, 0, &a, &b);
	live(v, e, 3, &c, &d);
	return a | b | c | d;
}

static void add(struct epmu_vcpu *e, uint64_t which, uint64_t n)
{
	struct epmu_state *s = e->st;

	for (int b = 0; b < 64; b++) {
		uint64_t *ctr, mask, old;
		bool pmi;

		if (!(which >> b & 1))
			continue;
		if (b < 32) {
			ctr = &s->ctr[b];
			mask = gp_mask(e);
			pmi = s->sel[b] & EVTSEL_INT;
		} else {
			ctr = &s->fixed[b - 32];
			mask = fixed_mask_w(e);
			pmi = s->fixed_ctrl >> (4 * (b - 32)) & FIXED_CTRL_PMI;
		}
		old = *ctr & mask;
		*ctr = (old + n) & mask;
		if (*ctr < old) {     /* wrapped: overflow status, and a PMI if asked */
			s->global_status |= 1ULL << b;
			if (pmi)
				e->pmi_pending = true;
		}
	}
}

static int cpl_of(const struct kvm_run *run)
{
	return run->s.regs.sregs.cs.dpl;
}

/* The handler the guest's IDT names for `vector` (64-bit interrupt gate). */
static uint64_t idt_handler(struct vcpu *v, uint32_t vector)
{
	uint64_t base = v->run->s.regs.sregs.idt.base + 16ULL * vector, lo, hi;

	if (base + 16 > v->vm->mem_size)
		return 0;
	memcpy(&lo, v->vm->mem + base, 8);
	memcpy(&hi, v->vm->mem + base + 8, 8);
	return (lo & 0xffff) | (lo >> 48 & 0xffff) << 16 | (hi & 0xffffffffULL) << 32;
}

/*
 * A pending PMI, through the guest's LVTPC (read from the in-kernel LAPIC).  The interrupt is
 * injected with KVM_SET_VCPU_EVENTS once the guest can take it (IF=1, no shadow, nothing else in
 * flight): on PVM hosts a KVM_SIGNAL_MSI reaches the LAPIC but never the guest's IDT.
 */
static int deliver_pmi(struct vcpu *v, struct epmu_vcpu *e)
{
	struct kvm_lapic_state lapic;
	struct kvm_vcpu_events ev;
	uint32_t lvt;

	if (faults[F_PMI_LOST]) {
		e->pmi_pending = false;
		return 0;
	}
	if (ioctl(v->fd, KVM_GET_LAPIC, &lapic) < 0)
		return vm_fail(v->vm, "emulated PMU: KVM_GET_LAPIC: %s", strerror(errno));
	memcpy(&lvt, lapic.regs + LAPIC_LVTPC, sizeof(lvt));
	if (trace)
		fprintf(stderr, "epmu: PMI, LVTPC %#x\n", lvt);
	if (lvt & LVT_MASKED) {
		e->pmi_pending = false;     /* a masked LVT entry drops the interrupt */
		return 0;
	}
	if ((lvt & (7U << 8)) == LVT_DM_NMI) {
		if (ioctl(v->fd, KVM_NMI) < 0)
			return vm_fail(v->vm, "emulated PMU: KVM_NMI: %s", strerror(errno));
	} else {
		if (!(v->run->s.regs.regs.rflags & (1ULL << 9)))
			return 0;               /* IF=0: stays pending */
		if (ioctl(v->fd, KVM_GET_VCPU_EVENTS, &ev) < 0)
			return vm_fail(v->vm, "emulated PMU: KVM_GET_VCPU_EVENTS: %s", strerror(errno));
		if (ev.interrupt.injected || ev.interrupt.shadow || ev.exception.injected || ev.nmi.injected)
			return 0;
		ev.interrupt.injected = 1;
		ev.interrupt.nr = (uint8_t)lvt;
		ev.interrupt.soft = 0;
		ev.flags = 0;
		if (ioctl(v->fd, KVM_SET_VCPU_EVENTS, &ev) < 0)
			return vm_fail(v->vm, "emulated PMU: KVM_SET_VCPU_EVENTS: %s", strerror(errno));
		/* The next instruction to retire is the handler's first. */
		if (e->stepping)
			e->prev_rip = idt_handler(v, lvt & 0xff);
	}
	e->pmi_pending = false;
	/* kvm_apic_local_deliver(): Intel-compatible guests get LVTPC masked on delivery. */
	if (host->r->lvtpc_mask_on_pmi) {
		lvt |= LVT_MASKED;
		memcpy(lapic.regs + LAPIC_LVTPC, &lvt, sizeof(lvt));
		if (ioctl(v->fd, KVM_SET_LAPIC, &lapic) < 0)
			return vm_fail(v->vm, "emulated PMU: KVM_SET_LAPIC: %s", strerror(errno));
	}
	return 0;
}

/* One instruction retired at prev_rip, counted by the counters live before it executed. */
static void retire(struct vcpu *v, struct epmu_vcpu *e, uint64_t rip_after)
{
	if (e->active_insn)
		add(e, e->active_insn, 1);
	if (e->active_br) {
		bool br = false;
		unsigned int id;

#ifdef HAVE_CAPSTONE
		decode(v, e->prev_rip, &br, &id);
#endif
		(void)id;
		if (br)
			add(e, e->active_br, 1);
	}
	(void)v;        /* only the decoder reads guest memory */
	e->prev_rip = rip_after;
}

/* An instruction boundary at `rip`: take the live counters, step while any can count, deliver a PMI. */
static int boundary(struct vcpu *v, struct epmu_vcpu *e, uint64_t rip)
{
	bool want = want_steps(v, e);

	e->prev_cpl = cpl_of(v->run);
	live(v, e, e->prev_cpl, &e->active_insn, &e->active_br);
	e->prev_rip = rip;
	if (want != e->stepping)
		debug_set(v, e, want);
	if (e->pmi_pending && deliver_pmi(v, e))
		return -1;
	return 0;
}

/* ---- MSRs ------------------------------------------------------------------------------------ */

enum kind { K_NONE, K_SEL, K_CTR, K_CTR_LEGACY, K_FIXED, K_FIXED_CTRL, K_GCTRL, K_GSTATUS, K_GCLR,
	    K_GSET, K_CAPS, K_QUIRK };

/* What an MSR is for this guest; idx = counter.  K_NONE: #GP (or the unexposed fault). */
static enum kind classify(const struct epmu_vcpu *e, uint32_t msr, int *idx, bool *pmu_range)
{
	const struct epmu_regs *r = host->r;
	const struct pmu_layout *l = r->l;
	const struct pmu_info *p = &e->pmu;
	int gp = p->gp;

	*pmu_range = false;
	for (size_t i = 0; i < ARRAY_SIZE(r->filter) && r->filter[i].count; i++)
		if (msr >= r->filter[i].base && msr < r->filter[i].base + r->filter[i].count)
			*pmu_range = true;
	*idx = 0;
	if (p->version) {
		bool core = l != &amd_layout || p->perfctr_core;

		if (core && msr >= l->sel_base && (msr - l->sel_base) % l->stride == 0 &&
		    (msr - l->sel_base) / l->stride < (uint32_t)gp && (l->stride == 1 || !(msr & 1)))
			return *idx = (int)((msr - l->sel_base) / l->stride), K_SEL;
		if (core && msr >= l->ctr_base && (msr - l->ctr_base) % l->stride == 0 &&
		    (msr - l->ctr_base) / l->stride < (uint32_t)gp && e->fw_writes)
			return *idx = (int)((msr - l->ctr_base) / l->stride), K_CTR;
		if (l->legacy_ctr_base && msr >= l->legacy_ctr_base && msr - l->legacy_ctr_base < (uint32_t)gp)
			return *idx = (int)(msr - l->legacy_ctr_base), K_CTR_LEGACY;
		if (r->k7_count && msr >= r->k7_sel && msr - r->k7_sel < r->k7_count && msr - r->k7_sel < (uint32_t)gp)
			return *idx = (int)(msr - r->k7_sel), K_SEL;
		if (r->k7_count && msr >= r->k7_ctr && msr - r->k7_ctr < r->k7_count && msr - r->k7_ctr < (uint32_t)gp)
			return *idx = (int)(msr - r->k7_ctr), K_CTR;
		if (l->fixed_base && msr >= l->fixed_base && msr - l->fixed_base < 32 &&
		    (p->fixed_mask >> (msr - l->fixed_base) & 1))
			return *idx = (int)(msr - l->fixed_base), K_FIXED;
		if (p->has_global && l->fixed_ctrl && msr == l->fixed_ctrl)
			return K_FIXED_CTRL;
		if (p->has_global && msr == l->global_ctrl)
			return K_GCTRL;
		if (p->has_global && msr == l->global_status)
			return K_GSTATUS;
		if (p->has_global && msr == l->global_status_clr)
			return K_GCLR;
		if (p->has_status_set && msr == l->global_status_set)
			return K_GSET;
	}
	if (l->perf_capabilities && msr == l->perf_capabilities && e->pdcm)
		return K_CAPS;
	/* kvm_{get,set}_msr_common(): MSR_K7_EVNTSEL0-3/PERFCTR0-3 and MSR_P6_EVNTSEL0/1/PERFCTR0/1
	 * read 0 and drop writes when the PMU does not claim them. */
	if ((msr >= 0xc0010000 && msr <= 0xc0010007) || (msr >= 0xc1 && msr <= 0xc2) ||
	    (msr >= 0x186 && msr <= 0x187))
		return K_QUIRK;
	return K_NONE;
}

static uint64_t fixed_ctrl_rsvd(const struct epmu_vcpu *e)
{
	uint64_t ok = 0;

	for (int j = 0; j < 16; j++)
		if (e->pmu.fixed_mask >> j & 1)
			ok |= 0xbULL << (4 * j);
	return ~ok;
}

/* A value "the hardware" returns for an MSR KVM should not have passed through (fault). */
static uint64_t host_garbage(uint32_t msr)
{
	return (0x9e3779b9ULL * (msr + 1)) & 0xffffffffULL;
}

static int msr_read(struct vcpu *v, struct epmu_vcpu *e, uint32_t msr, uint64_t *val)
{
	struct epmu_state *s = e->st;
	bool range;
	int i;

	(void)v;
	switch (classify(e, msr, &i, &range)) {
	case K_SEL: *val = s->sel[i]; return 0;
	case K_CTR:
	case K_CTR_LEGACY: *val = s->ctr[i] & gp_mask(e); return 0;
	case K_FIXED: *val = s->fixed[i] & fixed_mask_w(e); return 0;
	case K_FIXED_CTRL: *val = s->fixed_ctrl; return 0;
	case K_GCTRL: *val = s->global_ctrl; return 0;
	case K_GSTATUS: *val = s->global_status; return 0;
	case K_GCLR:
	case K_GSET: *val = 0; return 0;
	case K_CAPS: *val = e->perf_caps; return 0;
	case K_QUIRK: *val = 0; return 0;
	case K_NONE:
		if (range && faults[F_UNEXPOSED]) {
			*val = host_garbage(msr);
			return 0;
		}
		return -1;
	}
	return -1;
}

static int msr_write(struct vcpu *v, struct epmu_vcpu *e, uint32_t msr, uint64_t val)
{
	const struct epmu_regs *r = host->r;
	struct epmu_state *s = e->st;
	uint64_t status_rsvd = ~(global_ctrl_valid(e) | (r == &intel_regs ? r->status_extra : 0));
	bool range;
	int i;

	switch (classify(e, msr, &i, &range)) {
	case K_SEL:
		if (val & r->sel_rsvd) {
			if (r->sel_rsvd_gp)
				return -1;
			val &= ~r->sel_rsvd;
		}
		s->sel[i] = val;
		s->sel_allowed[i] = gp_allowed(filter_of(v), r, val);
		return 0;
	case K_CTR:
		if (r->beyond_width_gp && (val & ~width_mask(e->pmu.gp_width)) && !faults[F_WRONG_WIDTH])
			return -1;
		s->ctr[i] = val & gp_mask(e);
		return 0;
	case K_CTR_LEGACY:
		s->ctr[i] = (uint64_t)(int64_t)(int32_t)val & gp_mask(e);
		return 0;
	case K_FIXED:
		s->fixed[i] = val & fixed_mask_w(e);
		return 0;
	case K_FIXED_CTRL:
		if (val & fixed_ctrl_rsvd(e))
			return -1;
		s->fixed_ctrl = val;
		return 0;
	case K_GCTRL:
		if (val & ~global_ctrl_valid(e))
			return -1;
		s->global_ctrl = val;
		return 0;
	case K_GSTATUS:
	case K_CAPS:
		return -1;      /* read-only for the guest */
	case K_GCLR:
		if (val & status_rsvd)
			return -1;
		s->global_status &= ~val;
		return 0;
	case K_GSET:
		if (val & status_rsvd)
			return -1;
		s->global_status |= val;
		return 0;
	case K_QUIRK:
		return 0;
	case K_NONE:
		return range && faults[F_UNEXPOSED] ? 0 : -1;
	}
	return -1;
}

int epmu_feature_msr(uint32_t msr, uint64_t *val)
{
	/* kvm_get_msr_feature(): PERF_CAPABILITIES = kvm_caps.supported_perf_cap (0 on AMD). */
	if (!usable() || msr != MSR_IA32_PERF_CAPABILITIES)
		return -1;
	*val = host->r->l == &intel_layout ? host->perf_caps : 0;
	return 0;
}

int epmu_host_msr(struct vcpu *v, uint32_t msr, uint64_t *val, bool write)
{
	struct epmu_vcpu *e = v->epmu;
	bool range;
	int idx;

	if (!e)
		return -1;
	if (msr == MSR_IA32_PERF_CAPABILITIES && host->r->l == &intel_layout) {
		if (!write) {
			*val = e->perf_caps;
			return 0;
		}
		/* kvm_set_msr_common(): without PDCM in the guest CPUID only the host's write of 0
		 * passes (KVM_MSR_RET_UNSUPPORTED; vmx_pmu_caps_test.c perf_capabilities_unsupported). */
		if (!e->pdcm)
			return *val ? EINVAL : 0;
		/* vmx_set_msr(): only bits KVM supports; the FW_WRITES bit gates the PMCx aliases.
		 * kvm_set_msr_common(): a feature MSR is immutable once the vCPU has run. */
		if (*val & ~host->perf_caps || (e->has_run && *val != e->perf_caps))
			return EINVAL;
		e->perf_caps = *val;
		e->fw_writes = *val & PERF_CAP_FW_WRITES;
		return 0;
	}
	if (classify(e, msr, &idx, &range) == K_NONE && !range)
		return -1;
	if (write)
		return msr_write(v, e, msr, *val) ? EINVAL : 0;
	return msr_read(v, e, msr, val) ? EINVAL : 0;
}

/* ---- RDPMC (kvm_pmu_rdpmc) ------------------------------------------------------------------- */

/*
 * intel_rdpmc_ecx_to_pmc(): bit 30 selects fixed counters, other bits above 15 (including the
 * old "fast" bit 31) are reserved -> #GP; amd_rdpmc_ecx_to_pmc(): the index is the whole ECX.
 */
static int rdpmc_value(struct epmu_vcpu *e, uint32_t ecx, uint64_t *val)
{
	const struct pmu_layout *l = host->r->l;
	uint32_t idx = ecx & 0xffff, type = ecx & ~0xffffU;

	if (!e->pmu.version) {
		if (faults[F_UNEXPOSED] && !(ecx & RDPMC_FAST)) {
			*val = host_garbage(ecx);
			return 0;
		}
		return -1;
	}
	if (l->rdpmc_fixed_flag && type == l->rdpmc_fixed_flag) {
		if (idx < 32 && (e->pmu.fixed_mask >> idx & 1)) {
			*val = e->st->fixed[idx] & fixed_mask_w(e);
			return 0;
		}
	} else if (type == 0 && idx < (uint32_t)e->pmu.gp) {
		*val = e->st->ctr[idx] & gp_mask(e);
		return 0;
	}
	if (faults[F_UNEXPOSED] && !(ecx & RDPMC_FAST)) {
		*val = host_garbage(ecx);
		return 0;
	}
	return -1;
}

/* The guest is stopped before an RDPMC: emulate it, #GP included, and step over it. */
static int emulate_rdpmc(struct vcpu *v, struct epmu_vcpu *e)
{
	struct kvm_regs *regs = &v->run->s.regs.regs;
	uint64_t val;

	if (rdpmc_value(e, (uint32_t)regs->rcx, &val)) {
		struct kvm_vcpu_events ev;

		if (ioctl(v->fd, KVM_GET_VCPU_EVENTS, &ev) < 0)
			return vm_fail(v->vm, "emulated PMU: KVM_GET_VCPU_EVENTS: %s", strerror(errno));
		ev.exception.injected = 1;
		ev.exception.nr = 13;
		ev.exception.has_error_code = 1;
		ev.exception.error_code = 0;
		ev.flags = 0;
		if (ioctl(v->fd, KVM_SET_VCPU_EVENTS, &ev) < 0)
			return vm_fail(v->vm, "emulated PMU: KVM_SET_VCPU_EVENTS: %s", strerror(errno));
		return 0;
	}
	if (e->stepping)
		retire(v, e, regs->rip + 2);    /* RDPMC retires like any instruction */
	regs->rax = val & 0xffffffffULL;
	regs->rdx = val >> 32;
	regs->rip += 2;
	v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
	return 0;
}

/* ---- exits ----------------------------------------------------------------------------------- */

/*
 * Back from a userspace exit.  Faults and errata that act "at VM-exit/VM-entry" act here; they
 * use the counters live after the exit was handled.
 */
static int after_exit(struct vcpu *v, struct epmu_vcpu *e, bool io)
{
	uint64_t insn, br;

	if (faults[F_GLOBAL_NOT_RESTORED] && e->pmu.has_global)
		e->st->global_ctrl = width_mask(e->pmu.gp);     /* reloaded with its RESET value */
	live(v, e, e->prev_cpl, &insn, &br);
	if (io && faults[F_NOT_STOPPED]) {
		add(e, insn, HOST_INSNS_PER_EXIT);
		add(e, br, HOST_BRANCHES_PER_EXIT);
	}
	if (io && errata[E_INSN_PER_EXIT])
		add(e, insn, 1);
	if (io && errata[E_BR_PER_EXIT])
		add(e, br, 1);
	/* AMD: the VMRUN that resumes the guest retires as a guest branch. */
	if (errata[E_VMRUN_BRANCH])
		add(e, br, 1);
	if (e->pmi_pending)
		return deliver_pmi(v, e);
	return 0;
}

int epmu_io_exit(struct vcpu *v)
{
	struct epmu_vcpu *e = v->epmu;

	if (!e)
		return 0;
	if (e->stepping) {
		bool br = false;
		unsigned int id = 0;
		int len = 0;

#ifdef HAVE_CAPSTONE
		len = decode(v, e->prev_rip, &br, &id);
#endif
		(void)id;
		(void)br;
		/* The OUT retired inside KVM with no step exit: count it here, then go on from after it. */
		retire(v, e, e->prev_rip + (uint64_t)len);
	}
	if (after_exit(v, e, true))
		return -1;
	if (e->stepping)
		live(v, e, e->prev_cpl, &e->active_insn, &e->active_br);
	return 0;
}

int epmu_run_start(struct vcpu *v)
{
	struct epmu_vcpu *e = v->epmu;
	struct kvm_regs regs;

	if (!e)
		return 0;
	e->has_run = true;
	/* The host may have changed the filter since the guest last ran. */
	if (e->stepping == want_steps(v, e))
		return 0;
	if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
		return vm_fail(v->vm, "emulated PMU: KVM_GET_REGS: %s", strerror(errno));
	e->prev_rip = regs.rip;
	live(v, e, e->prev_cpl, &e->active_insn, &e->active_br);
	debug_set(v, e, !e->stepping);
	return 0;
}

int epmu_exit(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	struct epmu_vcpu *e = v->epmu;

	if (!e)
		return 0;
	switch (run->exit_reason) {
	case KVM_EXIT_X86_RDMSR: {
		uint64_t val = 0;

		run->msr.error = msr_read(v, e, run->msr.index, &val) ? 1 : 0;
		run->msr.data = val;
		if (trace)
			fprintf(stderr, "epmu: rdmsr %#x -> %#llx%s\n", run->msr.index,
				(unsigned long long)val, run->msr.error ? " #GP" : "");
		return after_exit(v, e, false) ? -1 : 1;
	}
	case KVM_EXIT_X86_WRMSR:
		run->msr.error = msr_write(v, e, run->msr.index, run->msr.data) ? 1 : 0;
		if (trace)
			fprintf(stderr, "epmu: wrmsr %#x <- %#llx%s (stepping %d)\n", run->msr.index,
				(unsigned long long)run->msr.data, run->msr.error ? " #GP" : "", e->stepping);
		if (after_exit(v, e, false))
			return -1;
		/*
		 * The WRMSR retires under the counters live before it, so the live set is left alone
		 * until its step exit; if nothing was live, it opens the window: step from here.
		 */
		if (!e->stepping && want_steps(v, e)) {
			e->active_insn = e->active_br = 0;
			e->prev_rip = run->s.regs.regs.rip;
			debug_set(v, e, true);
		}
		return 1;
	case KVM_EXIT_DEBUG: {
		uint64_t pc = run->debug.arch.pc;
		bool site = false;

		for (uint32_t i = 0; i < e->nsites; i++)
			site |= e->sites[i] == pc;
		if (trace)
			fprintf(stderr, "epmu: debug pc %#llx dr6 %#llx cpl %d\n", (unsigned long long)pc,
				(unsigned long long)run->debug.arch.dr6, cpl_of(run));
		if (e->stepping && (run->debug.arch.dr6 & (1ULL << 14)))
			retire(v, e, pc);
		if (boundary(v, e, pc))
			return -1;
		if (site)
			return emulate_rdpmc(v, e) ? -1 : 1;
		return 1;
	}
	default:
		return 0;
	}
}
