// SPDX-License-Identifier: GPL-2.0
/* The probe table, argument parsing and helpers shared by lib/probes_*.c. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "probes.h"

#define ITERS(def) { "iterations", false, def, 1, 1000000000, NULL, NULL }

static const char *const kinds[] = { "vm", "vcpu", NULL };
static const char *const lvtpc_modes[] = { "unmasked", "masked", NULL };
static const char *const filter_cases[] = {
	"none", "allow_member", "allow_nonmember", "deny_member", "deny_nonmember",
	"masked_include", "masked_exclude", "fixed_allow", "fixed_deny", "fixed_priority",
	"deny_high_select", NULL,
};
static const char *const densities[] = { "sparse", "dense", NULL };

static enum probe_status run_shaped(struct probe_ctx *c);

#define NOARGS { { 0 } }

/* Order, names, parameters and defaults follow agent/protocol.py PROBES. */
const struct probe probe_table[] = {
	{ "selftest", false, { ITERS(1000) }, run_shaped, probe_selftest, 0 },
	{ "guest_count", true, { ITERS(1000) }, run_shaped, probe_guest_count, 0 },
	{ "host_excludes_guest", true, { ITERS(1000000) }, run_shaped, probe_host_excludes_guest, 0 },
	{ "exclusivity", true, NOARGS, run_shaped, probe_exclusivity, 0 },
	{ "fresh_state", true, NOARGS, run_shaped, probe_fresh_state, 0 },
	{ "cross_context", true, {
		{ "rounds", false, 1000, 1, 100000000, NULL, NULL },
		{ "kind", true, 0, 0, 0, "vm", kinds } }, run_shaped, probe_cross_context, 0 },
	{ "unexposed", true, NOARGS, run_shaped, probe_unexposed, 0 },
	{ "pmu_disabled", true, NOARGS, run_shaped, probe_pmu_disabled, 0 },
	{ "hidden_counters", true, NOARGS, run_shaped, probe_hidden_counters, 0 },
	{ "pmu_enum", true, NOARGS, run_shaped, probe_pmu_enum, 0 },
	{ "guards", true, NOARGS, run_shaped, probe_guards, 0 },
	{ "arch_events", true, { ITERS(1000) }, run_shaped, probe_arch_events, 0 },
	{ "disabled_counter", true, { ITERS(1000) }, run_shaped, probe_disabled_counter, 0 },
	{ "counter_width", true, NOARGS, run_shaped, probe_counter_width, 0 },
	{ "global_ctrl", true, NOARGS, run_shaped, probe_global_ctrl, 0 },
	/* GLOBAL_STATUS_SET exists from v4 (kvm_pmu_is_valid_msr(): pmu->version > 3). */
	{ "overflow_status", true, NOARGS, run_shaped, probe_overflow_status, 4 },
	{ "rdpmc", true, NOARGS, run_shaped, probe_rdpmc, 0 },
	{ "fixed_counters", true, { ITERS(1000) }, run_shaped, probe_fixed_counters, 0 },
	{ "counter_freeze", true, { ITERS(1000) }, run_shaped, probe_counter_freeze, 0 },
	{ "all_counters", true, { ITERS(1000) }, run_shaped, probe_all_counters, 0 },
	{ "cmask", true, { ITERS(1000) }, run_shaped, probe_cmask, 0 },
	{ "running_write", true, { ITERS(1000) }, run_shaped, probe_running_write, 0 },
	{ "privilege", true, { ITERS(1000) }, run_shaped, probe_privilege, 0 },
	{ "umask_pair", true, { ITERS(1000) }, run_shaped, probe_umask_pair, 0 },
	{ "legacy_k7", true, { ITERS(1000) }, run_shaped, probe_legacy_k7, 0 },
	{ "event_filter", true, {
		{ "case", true, 0, 0, 0, "none", filter_cases },
		ITERS(1000) }, run_shaped, probe_event_filter, 0 },
	{ "filter_update", true, { ITERS(1000) }, run_shaped, probe_filter_update, 0 },
	{ "masked_events", true, {
		{ "density", true, 0, 0, 0, "sparse", densities },
		ITERS(1000) }, run_shaped, probe_masked_events, 0 },
	{ "filter_fixed_bitmap", true, { ITERS(1000) }, run_shaped, probe_filter_fixed_bitmap, 0 },
	{ "filter_invalid", true, NOARGS, run_shaped, probe_filter_invalid, 0 },
	{ "pmi", true, { { "lvtpc", true, 0, 0, 0, "unmasked", lvtpc_modes } }, run_shaped, probe_pmi, 0 },
	{ "overflow_all", true, NOARGS, run_shaped, probe_overflow_all, 0 },
};

static const char *const shape_names[PROBE_NSHAPE] = {
	"pmu_version", "gp_counters", "gp_width", "fixed_counters", "fixed_bitmap", "perf_capabilities",
	"pdcm",
};
const int probe_count = (int)(sizeof(probe_table) / sizeof(probe_table[0]));

const struct probe *probe_find(const char *name)
{
	for (int i = 0; i < probe_count; i++)
		if (!strcmp(probe_table[i].name, name))
			return &probe_table[i];
	return NULL;
}

static int nparams(const struct probe *p)
{
	int n = 0;

	while (n < PROBE_MAX_PARAMS && p->params[n].name)
		n++;
	return n;
}

static void known_params(const struct probe *p, char *out, size_t len)
{
	size_t used = 0;
	int n = nparams(p);

	used += (size_t)snprintf(out, len, "%s", n ? "" : "none; ");
	for (int i = 0; i < n && used < len; i++)
		used += (size_t)snprintf(out + used, len - used, "%s, ", p->params[i].name);
	if (p->needs_pmu)
		for (int i = 0; i < PROBE_NSHAPE && used < len; i++)
			used += (size_t)snprintf(out + used, len - used, "%s, ", shape_names[i]);
	if (used < len)
		snprintf(out + used, len - used, "and the harness option cpu");
}

int probe_parse_args(struct probe_ctx *c, int argc, char **argv)
{
	const struct probe *p = c->probe;
	int n = nparams(p);

	c->cpu = -1;
	for (int i = 0; i < PROBE_NSHAPE; i++)
		c->shape[i] = -1;
	for (int i = 0; i < n; i++) {
		c->ival[i] = p->params[i].def_int;
		if (p->params[i].is_str)
			snprintf(c->sval[i], PROBE_STR_LEN, "%s", p->params[i].def_str);
	}
	for (int a = 0; a < argc; a++) {
		char *eq = strchr(argv[a], '='), *end;
		const char *key = argv[a], *val;
		int i;

		if (!eq || eq == argv[a]) {
			probe_fail(c, "probe %s: argument '%s' is not k=v", p->name, argv[a]);
			return -1;
		}
		*eq = '\0';
		val = eq + 1;
		if (!strcmp(key, "cpu")) {
			long long cpu;

			errno = 0;
			cpu = strtoll(val, &end, 0);
			if (errno || !*val || *end || cpu < 0 || cpu >= 4096) {
				probe_fail(c, "probe %s: argument cpu=%s is not a CPU number", p->name, val);
				return -1;
			}
			c->cpu = (int)cpu;
			continue;
		}
		for (i = 0; p->needs_pmu && i < PROBE_NSHAPE && strcmp(shape_names[i], key); i++)
			;
		if (p->needs_pmu && i < PROBE_NSHAPE) {
			long long v;

			errno = 0;
			v = strtoll(val, &end, 0);
			if (errno || !*val || *end || v < -1) {
				probe_fail(c, "probe %s: argument %s='%s' is not an integer >= -1 (-1 = KVM's default)",
					   p->name, key, val);
				return -1;
			}
			c->shape[i] = v;
			continue;
		}
		for (i = 0; i < n && strcmp(p->params[i].name, key); i++)
			;
		if (i == n) {
			char known[256];

			known_params(p, known, sizeof(known));
			probe_fail(c, "probe %s: unknown parameter '%s' (known: %s)", p->name, key, known);
			return -1;
		}
		if (p->params[i].is_str) {
			const char *const *ch = p->params[i].choices;

			while (*ch && strcmp(*ch, val))
				ch++;
			if (!*ch || strlen(val) >= PROBE_STR_LEN) {
				char list[512];
				size_t used = 0;

				list[0] = '\0';
				for (ch = p->params[i].choices; *ch && used < sizeof(list); ch++)
					used += (size_t)snprintf(list + used, sizeof(list) - used, "%s%s",
								 used ? ", " : "", *ch);
				probe_fail(c, "probe %s: argument %s='%s' is not one of: %s", p->name, key,
					   val, list);
				return -1;
			}
			snprintf(c->sval[i], PROBE_STR_LEN, "%s", val);
		} else {
			long long v;

			errno = 0;
			v = strtoll(val, &end, 0);
			if (errno || !*val || *end) {
				probe_fail(c, "probe %s: argument %s='%s' is not an integer", p->name, key, val);
				return -1;
			}
			if (v < p->params[i].min_int || v > p->params[i].max_int) {
				probe_fail(c, "probe %s: argument %s=%lld is out of range [%" PRId64 ", %" PRId64 "]",
					   p->name, key, v, p->params[i].min_int, p->params[i].max_int);
				return -1;
			}
			c->ival[i] = v;
		}
	}
	return 0;
}

static int param_index(const struct probe_ctx *c, const char *name)
{
	for (int i = 0; i < PROBE_MAX_PARAMS && c->probe->params[i].name; i++)
		if (!strcmp(c->probe->params[i].name, name))
			return i;
	fprintf(stderr, "internal: probe %s has no parameter %s\n", c->probe->name, name);
	abort();
}

int64_t arg_int(const struct probe_ctx *c, const char *name)
{
	return c->ival[param_index(c, name)];
}

const char *arg_str(const struct probe_ctx *c, const char *name)
{
	return c->sval[param_index(c, name)];
}

static void set_reason(struct probe_ctx *c, const char *fmt, va_list ap)
{
	vsnprintf(c->reason, sizeof(c->reason), fmt, ap);
	/* The reason is one line, always. */
	for (char *s = c->reason; *s; s++)
		if (*s == '\n' || *s == '\r')
			*s = ' ';
}

enum probe_status probe_fail(struct probe_ctx *c, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	set_reason(c, fmt, ap);
	va_end(ap);
	return PROBE_ERROR;
}

enum probe_status probe_unsupported(struct probe_ctx *c, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	set_reason(c, fmt, ap);
	va_end(ap);
	return PROBE_UNSUPPORTED;
}

uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

struct vm_opts probe_opts(const struct probe_ctx *c)
{
	struct vm_opts o = { .irqchip = true };

	if (c->probe->needs_pmu && c->guest.layout)
		o.guest = &c->guest;
	return o;
}

int probe_vm(struct probe_ctx *c, struct vm *vm, struct vcpu **v, const struct vm_opts *opts)
{
	struct vm_opts o = *opts;
	struct guest_pmu_cfg none;
	int e;

	if (c->probe->needs_pmu && c->guest.layout && !o.guest)
		o.guest = &c->guest;
	if (o.pmu_disable && o.guest) {
		/* KVM leaves CPUID alone for a PMU-disabled VM; the VMM must say "no PMU" (finding 3). */
		none = *o.guest;
		none.no_pmu = true;
		memset(&none.pmu, 0, sizeof(none.pmu));
		none.perf_capabilities = -1;
		o.guest = &none;
	}
	if (vm_create(vm, &o)) {
		probe_fail(c, "%s", vm->err);
		return -1;
	}
	e = vcpu_add(vm, 0, v);
	if (e) {
		probe_fail(c, "%s", vm->err);
		return -1;
	}
	return 0;
}

void json_exceptions(struct json *j, const struct vcpu *v)
{
	json_arr_begin(j, "exceptions");
	for (uint32_t i = 0; v && i < vcpu_nexc(v); i++) {
		const struct guest_exc *e = vcpu_exception(v, i);

		json_obj_begin(j, NULL);
		json_u64(j, "vector", e->vector);
		json_u64(j, "rip", e->rip);
		json_obj_end(j);
	}
	json_arr_end(j);
}

void json_workload(struct probe_ctx *c, const char *key, enum loop_kind k, uint64_t n, uint64_t exits,
		   int64_t kvm_exits)
{
	static const char *const names[] = { "plain", "exit_each", "clflush" };
	uint64_t per_iter = k == LOOP_CLFLUSH ? MEASURE_CLFLUSH_INSNS_PER_ITER : MEASURE_INSNS_PER_ITER;
	/* An intercepted GLOBAL_CTRL puts one VM-entry and one VM-exit inside the window (finding 12). */
	uint64_t msr_exits = probe_global_ctrl_intercepted(c) ? 1 : 0;
	struct json *j = c->obs;

	json_obj_begin(j, key);
	json_u64(j, "iterations", n);
	json_u64(j, "instructions", per_iter * n + MEASURE_INSNS_EXTRA);
	json_u64(j, "branches", MEASURE_BRANCHES_PER_ITER * n + MEASURE_BRANCHES_EXTRA);
	json_u64(j, "vm_exits", exits + msr_exits);
	json_u64(j, "global_ctrl_exits", msr_exits);
	json_str(j, "loop", names[k]);
	json_opt_i64(j, "kvm_exits", kvm_exits);
	json_obj_end(j);
}

void json_access(struct json *j, const char *key, const char *op, uint32_t target, const char *name,
		 const struct guest_cmd *cmd, bool has_written, uint64_t written)
{
	json_obj_begin(j, key);
	json_str(j, "op", op);
	json_u64(j, "target", target);
	json_str(j, "name", name);
	if (has_written)
		json_u64(j, "written", written);
	else
		json_null(j, "written");
	json_opt_i64(j, "vector", cmd ? cmd->vector : -1);
	if (cmd && cmd->vector < 0 && strcmp(op, "wrmsr"))
		json_u64(j, "value", cmd->out[0]);
	else
		json_null(j, "value");
	json_obj_end(j);
}

void g_pmu_quiesce(struct probe_ctx *c, struct vcpu *v)
{
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;

	if (p->has_global)
		g_wrmsr(v, l->global_ctrl, 0);
	for (int i = 0; i < p->gp; i++) {
		g_wrmsr(v, pmu_sel_msr(l, i), 0);
		g_wrmsr(v, pmu_ctr_msr(l, i), 0);
	}
	if (l->fixed_ctrl && p->fixed_mask) {
		g_wrmsr(v, l->fixed_ctrl, 0);
		for (int j = 0; j < p->fixed; j++)
			if (p->fixed_mask >> j & 1)
				g_wrmsr(v, l->fixed_base + (uint32_t)j, 0);
	}
	if (p->has_global && l->global_status_clr)
		g_wrmsr(v, l->global_status_clr, pmu_global_mask(p, true));
}

struct guest_cmd *g_measure(struct probe_ctx *c, struct vcpu *v, uint64_t enable_mask, uint64_t n,
			    bool exit_each)
{
	return batch_add(v, OP_MEASURE, c->l->global_ctrl, enable_mask, 0, n, exit_each);
}

struct guest_cmd *g_measure_loop(struct probe_ctx *c, struct vcpu *v, uint64_t enable_mask, uint64_t n,
				 enum loop_kind k)
{
	return batch_add(v, OP_MEASURE, c->l->global_ctrl, enable_mask, 0, n,
			 k == LOOP_CLFLUSH ? MEASURE_LOOP_CLFLUSH : k == LOOP_EXIT_EACH ? MEASURE_LOOP_EXIT : 0);
}

enum probe_status probe_need_counters(struct probe_ctx *c, int gp)
{
	if (!c->pmu.has_global)
		return probe_unsupported(c, "the guest PMU (version %d as shaped into its CPUID) has no "
					 "global control register", c->pmu.version);
	if (c->pmu.gp < gp)
		return probe_unsupported(c, "the guest PMU enumerates %d GP counters (needs %d)",
					 c->pmu.gp, gp);
	return PROBE_OK;
}

bool probe_full_width(const struct probe_ctx *c)
{
	/* IA32_PMCx exists only with PERF_CAPABILITIES.FW_WRITES (vmx_recalc_pmu_msr_intercepts). */
	return !c->l->perf_capabilities || (c->pmu.pdcm && c->perf_caps >= 0 &&
					    (c->perf_caps & (int64_t)PERF_CAP_FW_WRITES));
}

/* kvm.enable_vmware_backdoor: 1/0, -1 unknown. */
static int vmware_backdoor(void)
{
	char b[8] = "";
	int fd = open("/sys/module/kvm/parameters/enable_vmware_backdoor", O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, b, sizeof(b) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	return b[0] == 'Y' || b[0] == '1';
}

/* What KVM's intercept rule sees (arch/x86/kvm/pmu.c, v6 22/44 "Disable interception of select
 * PMU MSRs for mediated vPMUs"): the guest's counts as intel/amd_pmu_refresh() clamp them to
 * KVM's capability, against kvm_host_pmu (the host's own PMU, not KVM's capability). */
struct path_inputs {
	bool mediated, guest_global;
	int guest_gp, host_gp, guest_fixed, host_fixed;
	int guest_gp_width, host_gp_width, guest_fixed_width, host_fixed_width;
	int vmware;
};

static int imin(int a, int b)
{
	return a < b ? a : b;
}

static void path_inputs(const struct probe_ctx *c, struct path_inputs *in)
{
	const struct pmu_info *g = &c->pmu, *h = &c->caps->host_pmu, *k = &c->caps->kvm_pmu;

	memset(in, 0, sizeof(*in));
	in->mediated = c->caps->nreasons == 0;
	in->guest_global = g->has_global;
	in->guest_gp = imin(g->gp, k->gp);
	in->host_gp = h->gp;
	/* Intel: nr_arch_fixed_counters = min(CPUID.0AH:EDX[4:0], KVM's fixed count), v2+ only. */
	in->guest_fixed = g->version >= 2 && c->l->fixed_base ? imin(g->fixed_contig, k->fixed) : 0;
	in->host_fixed = h->fixed;
	in->guest_gp_width = in->guest_gp ? imin(g->gp_width, k->gp_width) : 0;
	in->host_gp_width = h->gp_width;
	in->guest_fixed_width = in->guest_fixed ? imin(g->fixed_width, k->fixed_width) : 0;
	in->host_fixed_width = h->fixed ? h->fixed_width : 0;
	in->vmware = vmware_backdoor();
}

/* kvm_need_any_pmc_intercept(): no mediated PMU, or the guest's counter counts differ. */
static bool any_pmc_intercept(const struct path_inputs *in)
{
	return !in->mediated || in->guest_gp != in->host_gp || in->guest_fixed != in->host_fixed;
}

bool probe_global_ctrl_intercepted(const struct probe_ctx *c)
{
	struct path_inputs in;

	path_inputs(c, &in);
	/* kvm_need_perf_global_ctrl_intercept(): ... or the guest has no global control. */
	return any_pmc_intercept(&in) || !in.guest_global;
}

static void json_kvm_path(struct probe_ctx *c)
{
	struct path_inputs in;
	bool rdpmc;

	path_inputs(c, &in);
	/* kvm_need_rdpmc_intercept(): VMware backdoor, any PMC intercept, or the widths differ. */
	rdpmc = in.vmware == 1 || any_pmc_intercept(&in) || in.guest_gp_width != in.host_gp_width ||
		in.guest_fixed_width != in.host_fixed_width;
	json_obj_begin(c->obs, "kvm_path");
	json_str(c->obs, "global_ctrl", probe_global_ctrl_intercepted(c) ? "intercepted" : "passthrough");
	json_str(c->obs, "rdpmc", rdpmc ? "intercepted" : "passthrough");
	json_str(c->obs, "how", "derived");
	json_obj_begin(c->obs, "inputs");
	json_bool(c->obs, "mediated", in.mediated);
	json_i64(c->obs, "guest_gp", in.guest_gp);
	json_i64(c->obs, "host_gp", in.host_gp);
	json_i64(c->obs, "guest_fixed", in.guest_fixed);
	json_i64(c->obs, "host_fixed", in.host_fixed);
	json_i64(c->obs, "guest_gp_width", in.guest_gp_width);
	json_i64(c->obs, "host_gp_width", in.host_gp_width);
	json_i64(c->obs, "guest_fixed_width", in.guest_fixed_width);
	json_i64(c->obs, "host_fixed_width", in.host_fixed_width);
	json_bool(c->obs, "guest_global_ctrl", in.guest_global);
	if (in.vmware < 0)
		json_null(c->obs, "vmware_backdoor");
	else
		json_bool(c->obs, "vmware_backdoor", in.vmware == 1);
	json_obj_end(c->obs);
	json_obj_end(c->obs);
}

void json_pmu_info(struct json *j, const char *key, const struct pmu_info *p, int64_t perf_caps)
{
	json_obj_begin(j, key);
	json_i64(j, "version", p->version);
	json_i64(j, "gp_counters", p->gp);
	json_i64(j, "gp_width", p->gp_width);
	json_i64(j, "fixed_counters", p->fixed);
	json_u64(j, "fixed_bitmap", p->fixed_mask);
	json_i64(j, "fixed_width", p->fixed_width);
	json_opt_i64(j, "perf_capabilities", perf_caps);
	json_bool(j, "perfctr_core", p->perfctr_core);
	json_bool(j, "perfmon_v2", p->perfmon_v2);
	json_obj_end(j);
}

__attribute__((format(printf, 2, 3)))
static enum probe_status bad_shape(struct probe_ctx *c, const char *fmt, ...)
{
	char why[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	return probe_fail(c, "probe %s: %s", c->probe->name, why);
}

/*
 * The guest PMU: KVM's supported one (c->pmu on entry), with the shaping options applied, encoded
 * into a copy of KVM's supported CPUID and decoded back -- so c->pmu is exactly what the guest's
 * CPUID enumerates.  Mirrors the selftests, which take KVM's properties and override some.
 */
static enum probe_status probe_shape(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	const int64_t *a = c->shape;
	struct pmu_info w = c->pmu;
	struct kvm_cpuid2 *t;
	int max_version = l->fixed_base ? 255 : 2;   /* AMD: 0 none, 1 PerfCtrExtCore, 2 PerfMonV2 */

	if (w.fixed_mask && !w.fixed_contig && !w.fixed_ecx) {
		/* A shape given as a mask only (PMUFARM_VPMU_FORCE): contiguous part, rest as the v5 bitmap. */
		w.fixed_contig = __builtin_ctz(~w.fixed_mask);
		w.fixed_ecx = w.version >= 5 ? w.fixed_mask : 0;
	}

	if (a[SHAPE_VERSION] > max_version)
		return bad_shape(c, "pmu_version=%lld is above %d for %s", (long long)a[SHAPE_VERSION],
				 max_version, l->vendor);
	if (a[SHAPE_VERSION] >= 0)
		w.version = (int)a[SHAPE_VERSION];
	else if (w.version < c->probe->min_version)
		w.version = imin(c->probe->min_version, max_version);
	if (a[SHAPE_GP] > (int64_t)l->max_gp)
		return bad_shape(c, "gp_counters=%lld is more than the %u GP counters %s defines",
				 (long long)a[SHAPE_GP], l->max_gp, l->vendor);
	if (a[SHAPE_GP] >= 0 && !l->fixed_base && w.version < 2)
		return bad_shape(c, "gp_counters needs pmu_version 2 (PerfMonV2) on amd; version 1 has 6");
	if (a[SHAPE_GP] >= 0)
		w.gp = (int)a[SHAPE_GP];
	if (a[SHAPE_GP_WIDTH] >= 0 && (!l->fixed_base || a[SHAPE_GP_WIDTH] > 64))
		return bad_shape(c, "gp_width=%lld cannot be set on %s (Intel: 1..64)",
				 (long long)a[SHAPE_GP_WIDTH], l->vendor);
	if (a[SHAPE_GP_WIDTH] >= 0)
		w.gp_width = (int)a[SHAPE_GP_WIDTH];
	if ((a[SHAPE_FIXED] >= 0 || a[SHAPE_FIXED_BITMAP] >= 0) && !l->fixed_base)
		return bad_shape(c, "%s has no fixed counters (fixed_counters, fixed_bitmap)", l->vendor);
	if (a[SHAPE_FIXED] > (int64_t)l->nfixed_events || a[SHAPE_FIXED_BITMAP] >= 1LL << l->nfixed_events)
		return bad_shape(c, "fixed_counters/fixed_bitmap name more than the %zu fixed counters "
				 "Intel defines", l->nfixed_events);
	if (a[SHAPE_FIXED] >= 0)
		w.fixed_contig = (int)a[SHAPE_FIXED];
	if (a[SHAPE_FIXED_BITMAP] >= 0)
		w.fixed_ecx = (uint32_t)a[SHAPE_FIXED_BITMAP];
	if (a[SHAPE_PERF_CAPS] >= 0 && !l->perf_capabilities)
		return bad_shape(c, "%s has no IA32_PERF_CAPABILITIES (perf_capabilities)", l->vendor);
	if (a[SHAPE_PDCM] >= 0 && (!l->perf_capabilities || a[SHAPE_PDCM] > 1))
		return bad_shape(c, "pdcm=%lld: CPUID.1:ECX.PDCM is 0 or 1, on Intel only (not %s)",
				 (long long)a[SHAPE_PDCM], l->vendor);
	/* x86.c kvm_set_msr_common(): without PDCM only a host write of 0 is accepted. */
	if (a[SHAPE_PDCM] == 0 && a[SHAPE_PERF_CAPS] > 0)
		return bad_shape(c, "perf_capabilities=%#llx needs pdcm=1 (KVM takes only 0 without PDCM)",
				 (unsigned long long)a[SHAPE_PERF_CAPS]);
	if (a[SHAPE_PDCM] >= 0)
		w.pdcm = a[SHAPE_PDCM] == 1;
	if (!l->fixed_base) {
		/* AMD: the version decides the features (lib/pmu.c amd_encode). */
		if (w.version == 1)
			w.gp = 6;
		if (w.version >= 2 && a[SHAPE_GP] < 0 && w.gp == 0)
			w.gp = (int)l->max_gp;
	}

	t = c->caps->kvm_cpuid ? NULL : calloc(1, sizeof(*t));
	if (c->caps->kvm_cpuid) {
		size_t sz = sizeof(*t) + c->caps->kvm_cpuid->nent * sizeof(t->entries[0]);

		t = malloc(sz);
		if (t)
			memcpy(t, c->caps->kvm_cpuid, sz);
	}
	if (!t || l->encode(&t, &w, false)) {
		free(t);
		return probe_fail(c, "out of memory");
	}
	{
		struct cpuid_view view = kvm_cpuid_view(t);

		l->decode(&view, &c->pmu);
	}
	free(t);
	memset(&c->guest, 0, sizeof(c->guest));
	c->guest.layout = l;
	c->guest.pmu = c->pmu;
	c->guest.perf_capabilities = a[SHAPE_PERF_CAPS];
	c->perf_caps = -1;
	if (a[SHAPE_PERF_CAPS] >= 0) {
		c->perf_caps = a[SHAPE_PERF_CAPS];
	} else if (l->perf_capabilities) {
		int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
		uint64_t v;

		/* The vCPU starts with KVM's supported value (kvm_arch_vcpu_create). */
		if (fd >= 0 && !kvm_feature_msr(fd, l->perf_capabilities, &v))
			c->perf_caps = (int64_t)v;
		if (fd >= 0)
			close(fd);
	}
	/* vmx/pmu_intel.h vcpu_get_perf_capabilities(): 0 when the guest CPUID lacks PDCM. */
	if (l->perf_capabilities && !c->pmu.pdcm)
		c->perf_caps = 0;
	return PROBE_OK;
}

static enum probe_status run_shaped(struct probe_ctx *c)
{
	enum probe_status st;

	if (!c->probe->needs_pmu || !c->l)
		return c->probe->body(c);
	st = probe_shape(c);
	if (st != PROBE_OK)
		return st;
	json_pmu_info(c->obs, "guest_pmu", &c->pmu, c->perf_caps);
	json_kvm_path(c);
	return c->probe->body(c);
}

bool probe_guest_has_clflush(const struct probe_ctx *c)
{
	struct cpuid_view view = kvm_cpuid_view(c->caps->kvm_cpuid);
	uint32_t r[4] = { 0 };

	return c->caps->kvm_cpuid && view.get(&view, 1, 0, r) == 0 && (r[3] >> 19 & 1);
}

void json_reading(struct json *j, const char *key, struct reading r)
{
	if (r.ok)
		json_u64(j, key, r.value);
	else
		json_null(j, key);
}

int64_t vcpu_kvm_exits(struct vcpu *v)
{
	struct kvm_stats_header h;
	int64_t ret = -1;
	int fd = ioctl(v->fd, KVM_GET_STATS_FD, NULL);
	char *descs = NULL;
	size_t dsz;

	if (fd < 0)
		return -1;
	if (pread(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h))
		goto out;
	dsz = sizeof(struct kvm_stats_desc) + h.name_size;
	descs = calloc(h.num_desc, dsz);
	if (!descs || pread(fd, descs, h.num_desc * dsz, h.desc_offset) != (ssize_t)(h.num_desc * dsz))
		goto out;
	for (uint32_t i = 0; i < h.num_desc; i++) {
		struct kvm_stats_desc *d = (struct kvm_stats_desc *)(descs + i * dsz);
		uint64_t val;

		if (strncmp(d->name, "exits", h.name_size) || d->size < 1)
			continue;
		if (pread(fd, &val, sizeof(val), h.data_offset + d->offset) == (ssize_t)sizeof(val))
			ret = (int64_t)val;
		break;
	}
out:
	free(descs);
	close(fd);
	return ret;
}

int run_measured(struct probe_ctx *c, struct vcpu *v, uint64_t enable_mask, uint64_t n, enum loop_kind k,
		 struct run_stats *st, int64_t *kvm_exits)
{
	int64_t before, after;

	*kvm_exits = -1;
	if (batch_run(v, NULL))
		return -1;
	batch_begin(v);
	g_measure_loop(c, v, enable_mask, n, k);
	before = vcpu_kvm_exits(v);
	if (batch_run(v, st ? st : &(struct run_stats){ 0 }))
		return -1;
	after = vcpu_kvm_exits(v);
	if (before >= 0 && after >= before)
		*kvm_exits = after - before;
	batch_begin(v);
	return 0;
}
