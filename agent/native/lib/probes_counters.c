// SPDX-License-Identifier: GPL-2.0
/* Counter probes: what each architectural event counts, disabled counters, widths, GLOBAL_CTRL,
 * overflow status bits, and RDMSR/RDPMC agreement. */
#include <string.h>

#include "probes.h"

static const struct vm_opts default_opts = { .irqchip = true };

static int start(struct probe_ctx *c, struct vm *vm, struct vcpu **v)
{
	if (probe_vm(c, vm, v, &default_opts)) {
		vm_destroy(vm);
		return -1;
	}
	return 0;
}

static void json_value_or_null(struct json *j, const char *key, const struct guest_cmd *cmd)
{
	if (cmd && cmd->vector < 0)
		json_u64(j, key, cmd->out[0]);
	else
		json_null(j, key);
}

/*
 * Events upstream measures over a loop that flushes a cache line each iteration, "to force LLC
 * references and misses" (pmu_counters_test.c GUEST_MEASURE_EVENT / guest_assert_event_count():
 * LLC events must be non-zero only when CLFLUSH exists).  Finding 5.
 */
static bool wants_clflush(const struct pmu_event *e)
{
	return !strcmp(e->name, "llc_references") || !strcmp(e->name, "llc_misses") ||
	       !strcmp(e->name, "topdown_be_bound");
}

static int gp_count(const struct probe_ctx *c)
{
	return c->pmu.gp > (int)c->l->max_gp ? (int)c->l->max_gp : c->pmu.gp;
}

enum probe_status probe_arch_events(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	struct guest_cmd *reads[16];
	enum probe_status ret = probe_need_counters(c, 1);
	bool clflush = probe_guest_has_clflush(c);
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	json_workload(c, "workload", LOOP_PLAIN, n, 0);
	if (clflush)
		json_workload(c, "workload_clflush", LOOP_CLFLUSH, n, 0);
	else
		json_null(c->obs, "workload_clflush");
	json_arr_begin(c->obs, "gp");
	/* One batch per counter: every available event in turn, exit-free loop. */
	for (int i = 0; i < gp_count(c) && ret == PROBE_OK; i++) {
		size_t k, nr = 0;

		batch_begin(v);
		g_pmu_quiesce(c, v);
		for (k = 0; k < l->nevents && nr < 16; k++) {
			if (!(p->events_mask >> k & 1))
				continue;
			g_wrmsr(v, pmu_ctr_msr(l, i), 0);
			g_wrmsr(v, pmu_sel_msr(l, i), pmu_selector(&l->events[k], EVTSEL_EN));
			g_measure_loop(c, v, 1ULL << i, n,
				       clflush && wants_clflush(&l->events[k]) ? LOOP_CLFLUSH : LOOP_PLAIN);
			reads[nr++] = g_rdmsr(v, pmu_ctr_msr(l, i));
			g_wrmsr(v, pmu_sel_msr(l, i), 0);
		}
		if (batch_run(v, NULL))
			ret = probe_fail(c, "%s", vm.err);
		for (k = 0, nr = 0; k < l->nevents && nr < 16; k++) {
			if (!(p->events_mask >> k & 1))
				continue;
			json_obj_begin(c->obs, NULL);
			json_i64(c->obs, "counter", i);
			json_str(c->obs, "event", l->events[k].name);
			json_str(c->obs, "loop", clflush && wants_clflush(&l->events[k]) ? "clflush" : "plain");
			json_value_or_null(c->obs, "count", reads[nr++]);
			json_obj_end(c->obs);
		}
	}
	json_arr_end(c->obs);
	json_arr_begin(c->obs, "fixed");
	for (int j = 0; l->fixed_base && j < p->fixed && j < (int)l->nfixed_events && ret == PROBE_OK; j++) {
		struct guest_cmd *rd;

		if (!(p->fixed_mask >> j & 1))
			continue;
		batch_begin(v);
		g_pmu_quiesce(c, v);
		g_wrmsr(v, l->fixed_ctrl, (FIXED_CTRL_OS | FIXED_CTRL_USR) << (4 * j));
		g_measure(c, v, 1ULL << (32 + j), n, false);
		rd = g_rdmsr(v, l->fixed_base + (uint32_t)j);
		g_wrmsr(v, l->fixed_ctrl, 0);
		if (batch_run(v, NULL))
			ret = probe_fail(c, "%s", vm.err);
		json_obj_begin(c->obs, NULL);
		json_i64(c->obs, "counter", j);
		json_str(c->obs, "event", l->fixed_events[j]);
		json_str(c->obs, "loop", "plain");
		json_value_or_null(c->obs, "count", rd);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_disabled_counter(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	struct guest_cmd *gb[8], *ga[8], *fb[8] = { 0 }, *fa[8] = { 0 };
	enum probe_status ret = probe_need_counters(c, 1);
	int gp = gp_count(c);
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	batch_begin(v);
	g_pmu_quiesce(c, v);
	/* Programmed with an event but EN clear (fixed: field 0), while GLOBAL_CTRL enables all. */
	for (int i = 0; i < gp; i++) {
		g_wrmsr(v, pmu_sel_msr(l, i), pmu_selector(pmu_event(l, "instructions"), 0));
		gb[i] = g_rdmsr(v, pmu_ctr_msr(l, i));
	}
	for (int j = 0; l->fixed_base && j < p->fixed && j < 8; j++)
		if (p->fixed_mask >> j & 1)
			fb[j] = g_rdmsr(v, l->fixed_base + (uint32_t)j);
	g_measure(c, v, pmu_global_mask(p, true), n, false);
	for (int i = 0; i < gp; i++)
		ga[i] = g_rdmsr(v, pmu_ctr_msr(l, i));
	for (int j = 0; j < 8; j++)
		if (fb[j])
			fa[j] = g_rdmsr(v, l->fixed_base + (uint32_t)j);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_arr_begin(c->obs, "gp");
	for (int i = 0; i < gp; i++) {
		json_obj_begin(c->obs, NULL);
		json_i64(c->obs, "counter", i);
		json_value_or_null(c->obs, "before", gb[i]);
		json_value_or_null(c->obs, "after", ga[i]);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_arr_begin(c->obs, "fixed");
	for (int j = 0; j < 8; j++) {
		if (!fb[j])
			continue;
		json_obj_begin(c->obs, NULL);
		json_i64(c->obs, "counter", j);
		json_value_or_null(c->obs, "before", fb[j]);
		json_value_or_null(c->obs, "after", fa[j]);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

struct width_write {
	uint64_t written;
	struct guest_cmd *wr, *rd;
};

static void json_width_write(struct json *j, const char *key, const struct width_write *w)
{
	json_obj_begin(j, key);
	json_u64(j, "written", w->written);
	json_value_or_null(j, "read", w->wr->vector < 0 ? w->rd : NULL);
	json_opt_i64(j, "vector", w->wr->vector);
	json_obj_end(j);
}

enum probe_status probe_counter_width(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	int w = c->pmu.gp_width;
	uint64_t mask = width_mask(w);
	const uint64_t full_vals[3] = { 0x80000000ULL, 0x123456789abcULL & mask, mask };
	struct width_write legacy = { 0 }, full[3], beyond;
	enum probe_status ret = probe_need_counters(c, 1);
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	batch_begin(v);
	g_pmu_quiesce(c, v);
	if (l->legacy_ctr_base) {
		/* The legacy alias takes 32 bits (sign-extended); read it back through the full alias. */
		legacy.written = 0x89abcdefULL;
		legacy.wr = g_wrmsr(v, l->legacy_ctr_base, legacy.written);
		legacy.rd = g_rdmsr(v, pmu_ctr_msr(l, 0));
	}
	for (int i = 0; i < 3; i++) {
		full[i].written = full_vals[i];
		full[i].wr = g_wrmsr(v, pmu_ctr_msr(l, 0), full_vals[i]);
		full[i].rd = g_rdmsr(v, pmu_ctr_msr(l, 0));
	}
	g_wrmsr(v, pmu_ctr_msr(l, 0), 0);
	beyond.written = (w < 64 ? 1ULL << w : 0) | 0x1234;
	beyond.wr = g_wrmsr(v, pmu_ctr_msr(l, 0), beyond.written);
	beyond.rd = g_rdmsr(v, pmu_ctr_msr(l, 0));
	g_wrmsr(v, pmu_ctr_msr(l, 0), 0);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_i64(c->obs, "gp_width", w);
	if (l->legacy_ctr_base)
		json_width_write(c->obs, "legacy_write", &legacy);
	else
		json_null(c->obs, "legacy_write");
	json_arr_begin(c->obs, "full_width");
	for (int i = 0; i < 3; i++)
		json_width_write(c->obs, NULL, &full[i]);
	json_arr_end(c->obs);
	json_width_write(c->obs, "beyond_width", &beyond);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_global_ctrl(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	struct guest_cmd *reset, *after;
	enum probe_status ret = probe_need_counters(c, 1);
	uint64_t written;
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	batch_begin(v);
	reset = g_rdmsr(v, l->global_ctrl);            /* first access of a fresh vCPU */
	if (batch_run(v, NULL)) {
		ret = probe_fail(c, "%s", vm.err);
		vm_destroy(&vm);
		return ret;
	}
	/* Every other GP bit and fixed counters 0 and 2: distinct from the RESET value. */
	written = (0x5555ULL & pmu_global_mask(p, false)) |
		  (((uint64_t)p->fixed_mask << 32) & (0x5ULL << 32));
	json_i64(c->obs, "gp_counters", p->gp);
	json_i64(c->obs, "fixed_counters", __builtin_popcount(p->fixed_mask));
	json_value_or_null(c->obs, "reset_value", reset);
	batch_begin(v);
	g_wrmsr(v, l->global_ctrl, written);
	batch_add(v, OP_TICK, 0, 0, 0, 0, 0);          /* a VM-exit to userspace in between */
	after = g_rdmsr(v, l->global_ctrl);
	g_wrmsr(v, l->global_ctrl, 0);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_u64(c->obs, "written", written);
	json_value_or_null(c->obs, "after_exit", after);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_overflow_status(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	struct guest_cmd *ovf, *clr, *set_wr, *set;
	enum probe_status ret = probe_need_counters(c, 1);
	uint64_t set_mask = p->gp >= 2 ? 0x3 : 0x1;
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	batch_begin(v);
	g_pmu_quiesce(c, v);
	/* 16 instructions from overflow; the 100-iteration loop retires ~305. */
	g_wrmsr(v, pmu_ctr_msr(l, 0), width_mask(p->gp_width) - 15);
	g_wrmsr(v, pmu_sel_msr(l, 0), pmu_selector(pmu_event(l, "instructions"), EVTSEL_EN));
	g_measure(c, v, 0x1, 100, false);
	g_wrmsr(v, pmu_sel_msr(l, 0), 0);
	ovf = g_rdmsr(v, l->global_status);
	g_wrmsr(v, l->global_status_clr, 0x1);
	clr = g_rdmsr(v, l->global_status);
	set_wr = g_wrmsr(v, l->global_status_set, set_mask);
	set = g_rdmsr(v, l->global_status);
	g_wrmsr(v, l->global_status_clr, pmu_global_mask(p, true));
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_i64(c->obs, "counter", 0);
	json_value_or_null(c->obs, "after_overflow", ovf);
	json_value_or_null(c->obs, "after_clear", clr);
	json_value_or_null(c->obs, "after_set", set);
	json_u64(c->obs, "set_mask", set_mask);
	json_opt_i64(c->obs, "set_vector", set_wr->vector);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_rdpmc(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	struct { const char *kind; int idx; uint64_t written; struct guest_cmd *rd, *pmc; } r[16];
	enum probe_status ret = probe_need_counters(c, 1);
	struct vcpu *v;
	struct vm vm;
	int n = 0;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	batch_begin(v);
	g_pmu_quiesce(c, v);
	for (int i = 0; i < gp_count(c); i++, n++) {
		r[n].kind = "gp";
		r[n].idx = i;
		r[n].written = ((0xa5ULL + (uint64_t)i) << 32 | 0xdead0000ULL | (uint64_t)i) &
			       width_mask(p->gp_width);
		g_wrmsr(v, pmu_ctr_msr(l, i), r[n].written);
		r[n].rd = g_rdmsr(v, pmu_ctr_msr(l, i));
		r[n].pmc = g_rdpmc(v, (uint32_t)i);
	}
	for (int j = 0; l->fixed_base && j < p->fixed && j < 8; j++) {
		if (!(p->fixed_mask >> j & 1))
			continue;
		r[n].kind = "fixed";
		r[n].idx = j;
		r[n].written = ((0x5aULL + (uint64_t)j) << 32 | 0xbeef0000ULL | (uint64_t)j) &
			       width_mask(p->fixed_width);
		g_wrmsr(v, l->fixed_base + (uint32_t)j, r[n].written);
		r[n].rd = g_rdmsr(v, l->fixed_base + (uint32_t)j);
		r[n].pmc = g_rdpmc(v, l->rdpmc_fixed_flag | (uint32_t)j);
		n++;
	}
	g_pmu_quiesce(c, v);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_arr_begin(c->obs, "counters");
	for (int k = 0; k < n; k++) {
		json_obj_begin(c->obs, NULL);
		json_str(c->obs, "kind", r[k].kind);
		json_i64(c->obs, "index", r[k].idx);
		json_u64(c->obs, "written", r[k].written);
		json_value_or_null(c->obs, "rdmsr", r[k].rd);
		json_value_or_null(c->obs, "rdpmc", r[k].pmc);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_fixed_counters(struct probe_ctx *c)
{
	return probe_fail(c, "probe %s: not implemented in the native harness yet", c->probe->name);
}

enum probe_status probe_counter_freeze(struct probe_ctx *c)
{
	return probe_fail(c, "probe %s: not implemented in the native harness yet", c->probe->name);
}

enum probe_status probe_all_counters(struct probe_ctx *c)
{
	return probe_fail(c, "probe %s: not implemented in the native harness yet", c->probe->name);
}

enum probe_status probe_cmask(struct probe_ctx *c)
{
	return probe_fail(c, "probe %s: not implemented in the native harness yet", c->probe->name);
}

enum probe_status probe_running_write(struct probe_ctx *c)
{
	return probe_fail(c, "probe %s: not implemented in the native harness yet", c->probe->name);
}

enum probe_status probe_privilege(struct probe_ctx *c)
{
	return probe_fail(c, "probe %s: not implemented in the native harness yet", c->probe->name);
}

enum probe_status probe_umask_pair(struct probe_ctx *c)
{
	return probe_fail(c, "probe %s: not implemented in the native harness yet", c->probe->name);
}

enum probe_status probe_legacy_k7(struct probe_ctx *c)
{
	return probe_fail(c, "probe %s: not implemented in the native harness yet", c->probe->name);
}
