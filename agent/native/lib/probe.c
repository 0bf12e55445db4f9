// SPDX-License-Identifier: GPL-2.0
/* The probe table, argument parsing and helpers shared by lib/probes_*.c. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "probes.h"

#define ITERS(def) { "iterations", false, def, 1, 1000000000, NULL, NULL }

static const char *const kinds[] = { "vm", "vcpu", NULL };
static const char *const lvtpc_modes[] = { "unmasked", "masked", NULL };
static const char *const filter_cases[] = {
	"none", "allow_member", "allow_nonmember", "deny_member", "deny_nonmember",
	"masked_include", "masked_exclude", "fixed_allow", "fixed_deny", "fixed_priority", NULL,
};

/* Order, names, parameters and defaults follow agent/protocol.py PROBES. */
const struct probe probe_table[] = {
	{ "selftest", false, { ITERS(1000) }, probe_selftest },
	{ "guest_count", true, { ITERS(1000) }, probe_guest_count },
	{ "host_excludes_guest", true, { ITERS(1000000) }, probe_host_excludes_guest },
	{ "exclusivity", true, { { 0 } }, probe_exclusivity },
	{ "fresh_state", true, { { 0 } }, probe_fresh_state },
	{ "cross_context", true, {
		{ "rounds", false, 1000, 1, 100000000, NULL, NULL },
		{ "kind", true, 0, 0, 0, "vm", kinds } }, probe_cross_context },
	{ "unexposed", true, { { 0 } }, probe_unexposed },
	{ "pmu_disabled", true, { { 0 } }, probe_pmu_disabled },
	{ "arch_events", true, { ITERS(1000) }, probe_arch_events },
	{ "disabled_counter", true, { ITERS(1000) }, probe_disabled_counter },
	{ "counter_width", true, { { 0 } }, probe_counter_width },
	{ "global_ctrl", true, { { 0 } }, probe_global_ctrl },
	{ "overflow_status", true, { { 0 } }, probe_overflow_status },
	{ "rdpmc", true, { { 0 } }, probe_rdpmc },
	{ "event_filter", true, {
		{ "case", true, 0, 0, 0, "none", filter_cases },
		ITERS(1000) }, probe_event_filter },
	{ "filter_update", true, { ITERS(1000) }, probe_filter_update },
	{ "filter_invalid", true, { { 0 } }, probe_filter_invalid },
	{ "pmi", true, { { "lvtpc", true, 0, 0, 0, "unmasked", lvtpc_modes } }, probe_pmi },
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
	if (used < len)
		snprintf(out + used, len - used, "and the harness option cpu");
}

int probe_parse_args(struct probe_ctx *c, int argc, char **argv)
{
	const struct probe *p = c->probe;
	int n = nparams(p);

	c->cpu = -1;
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

int probe_vm(struct probe_ctx *c, struct vm *vm, struct vcpu **v, const struct vm_opts *o)
{
	int e;

	if (vm_create(vm, o)) {
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

void json_workload(struct json *j, uint64_t n, uint64_t exits)
{
	json_obj_begin(j, "workload");
	json_u64(j, "iterations", n);
	json_u64(j, "instructions", MEASURE_INSNS_PER_ITER * n + MEASURE_INSNS_EXTRA);
	json_u64(j, "branches", MEASURE_BRANCHES_PER_ITER * n + MEASURE_BRANCHES_EXTRA);
	json_u64(j, "vm_exits", exits);
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

enum probe_status probe_need_counters(struct probe_ctx *c, int gp)
{
	if (!c->pmu.has_global)
		return probe_unsupported(c, "the guest PMU (KVM supported CPUID, version %d) has no "
					 "global control register", c->pmu.version);
	if (c->pmu.gp < gp)
		return probe_unsupported(c, "the guest PMU enumerates %d GP counters (needs %d)",
					 c->pmu.gp, gp);
	return PROBE_OK;
}
