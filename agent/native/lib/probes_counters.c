// SPDX-License-Identifier: GPL-2.0
/* Counter probes: what each architectural event counts, disabled counters, widths, GLOBAL_CTRL,
 * overflow status bits, and RDMSR/RDPMC agreement. */
#include <linux/kvm.h>
#include <stdio.h>
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

/* One arch_events entry: the counter counts over the loop in a batch of its own. */
static enum probe_status arch_entry(struct probe_ctx *c, struct vcpu *v, const char *kind, int idx,
				    const char *event, enum loop_kind k, uint64_t n)
{
	static const char *const loops[] = { "plain", "exit_each", "clflush" };
	const struct pmu_layout *l = c->l;
	bool gp = !strcmp(kind, "gp");
	uint32_t ctr = gp ? pmu_ctr_msr(l, idx) : l->fixed_base + (uint32_t)idx;
	struct guest_cmd *rd = NULL;
	int64_t kvm_exits = -1;

	batch_begin(v);
	g_pmu_quiesce(c, v);
	if (gp)
		g_wrmsr(v, pmu_sel_msr(l, idx), pmu_selector(pmu_event(l, event), EVTSEL_EN));
	else
		g_wrmsr(v, l->fixed_ctrl, (FIXED_CTRL_OS | FIXED_CTRL_USR) << (4 * idx));
	if (!run_measured(c, v, gp ? 1ULL << idx : 1ULL << (32 + idx), n, k, NULL, &kvm_exits)) {
		rd = g_rdmsr(v, ctr);
		g_pmu_quiesce(c, v);
		if (batch_run(v, NULL))
			rd = NULL;
	}
	json_obj_begin(c->obs, NULL);
	json_i64(c->obs, "counter", idx);
	json_str(c->obs, "event", event);
	json_str(c->obs, "loop", loops[k]);
	json_value_or_null(c->obs, "count", rd);
	json_opt_i64(c->obs, "kvm_exits", kvm_exits);
	json_obj_end(c->obs);
	return rd ? PROBE_OK : probe_fail(c, "%s", v->vm->err);
}

/*
 * pmu_counters_test.c test_intel_counters() / test_arch_events(): KVM must not refuse an event
 * because the guest's CPUID.0AH says it is unavailable (EAX[31:24] length, EBX bit set) -- every
 * event the hardware has still counts.  The selftest sweeps lengths 0..N+1 against masks 0, all
 * ones and each single bit, and every multi-bit mask at length N; each combination here is a VM
 * that measures every host event on GP 0, so a representative subset: length 0 (everything beyond
 * the length), N with every bit set, N with alternate bits (a multi-bit mask), and N+1 (longer than
 * the events KVM knows) with one bit.  Intel only (AMD has no such enumeration).
 */
static enum probe_status arch_events_combo(struct probe_ctx *c, uint32_t len, uint32_t mask,
					   uint64_t n, bool clflush)
{
	const struct pmu_layout *l = c->l;
	struct guest_pmu_cfg cfg = c->guest;
	struct vm_opts o = { .irqchip = true, .guest = &cfg };
	uint32_t hw = c->caps->host_pmu.events_mask;
	enum probe_status ret = PROBE_OK;
	struct vcpu *v;
	struct vm vm;

	cfg.pmu.ebx_forced = true;
	cfg.pmu.ebx_length = len;
	cfg.pmu.ebx = mask;
	if (probe_vm(c, &vm, &v, &o)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	json_obj_begin(c->obs, NULL);
	json_i64(c->obs, "ebx_length", len);
	json_u64(c->obs, "ebx_mask", mask);
	json_u64(c->obs, "host_events_mask", hw);
	json_arr_begin(c->obs, "gp");
	for (size_t k = 0; k < l->nevents && ret == PROBE_OK; k++)
		if (hw >> k & 1)
			ret = arch_entry(c, v, "gp", 0, l->events[k].name,
					 clflush && wants_clflush(&l->events[k]) ? LOOP_CLFLUSH : LOOP_PLAIN, n);
	json_arr_end(c->obs);
	json_obj_end(c->obs);
	vm_destroy(&vm);
	return ret;
}

static enum probe_status arch_events_unenumerated(struct probe_ctx *c, uint64_t n, bool clflush)
{
	uint32_t nev = (uint32_t)c->l->nevents, all = (1u << nev) - 1;
	const uint32_t combos[][2] = {
		{ 0, 0 }, { nev, all }, { nev, 0x55555555u & all }, { nev + 1, 1u << 1 },
	};
	enum probe_status ret = PROBE_OK;

	if (!c->l->fixed_base || !c->guest.layout || c->pmu.version < 2) {
		json_null(c->obs, "unavailable_enumerated");
		return PROBE_OK;
	}
	json_arr_begin(c->obs, "unavailable_enumerated");
	for (size_t i = 0; i < sizeof(combos) / sizeof(combos[0]) && ret == PROBE_OK; i++)
		ret = arch_events_combo(c, combos[i][0], combos[i][1], n, clflush);
	json_arr_end(c->obs);
	return ret;
}

enum probe_status probe_arch_events(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	enum probe_status ret = probe_need_counters(c, 1);
	bool clflush = probe_guest_has_clflush(c);
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	json_workload(c, "workload", LOOP_PLAIN, n, 0, -1);
	if (clflush)
		json_workload(c, "workload_clflush", LOOP_CLFLUSH, n, 0, -1);
	else
		json_null(c->obs, "workload_clflush");
	/* Every available event on every GP counter, each in its own measured batch. */
	json_arr_begin(c->obs, "gp");
	for (int i = 0; i < gp_count(c) && ret == PROBE_OK; i++)
		for (size_t k = 0; k < l->nevents && ret == PROBE_OK; k++)
			if (p->events_mask >> k & 1)
				ret = arch_entry(c, v, "gp", i, l->events[k].name,
						 clflush && wants_clflush(&l->events[k]) ? LOOP_CLFLUSH : LOOP_PLAIN, n);
	json_arr_end(c->obs);
	json_arr_begin(c->obs, "fixed");
	for (int j = 0; l->fixed_base && j < p->fixed && j < (int)l->nfixed_events && ret == PROBE_OK; j++)
		if (p->fixed_mask >> j & 1)
			ret = arch_entry(c, v, "fixed", j, l->fixed_events[j], LOOP_PLAIN, n);
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	if (ret == PROBE_OK)
		ret = arch_events_unenumerated(c, n, clflush);
	else
		json_null(c->obs, "unavailable_enumerated");
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

/* Fixed counters the SDM defines (IA32_FIXED_CTR0..3); upstream probes 3, FC3 is TOPDOWN.SLOTS. */
#define POSSIBLE_FIXED 4

enum probe_status probe_fixed_counters(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	struct { struct guest_cmd *wr, *rd, *pmc, *ctrl, *gctl, *cnt; } a[POSSIBLE_FIXED];
	const uint64_t test_val = 0xffff;
	enum probe_status ret = PROBE_OK;
	struct vcpu *v;
	struct vm vm;

	if (!l->fixed_base)
		return probe_unsupported(c, "%s has no fixed counters", l->vendor);
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	memset(a, 0, sizeof(a));
	batch_begin(v);
	g_pmu_quiesce(c, v);
	for (int i = 0; i < POSSIBLE_FIXED; i++) {
		uint32_t msr = l->fixed_base + (uint32_t)i;

		/* Supported: i < CPUID.0AH:EDX[4:0] or, from v5, bit i of ECX (the decoded mask). */
		a[i].wr = g_wrmsr(v, msr, test_val);
		a[i].rd = g_rdmsr(v, msr);
		a[i].pmc = g_rdpmc(v, l->rdpmc_fixed_flag | (uint32_t)i);
		if (p->fixed_mask >> i & 1) {
			g_wrmsr(v, msr, 0);
			g_wrmsr(v, l->fixed_ctrl, (FIXED_CTRL_OS | FIXED_CTRL_USR) << (4 * i));
			g_measure(c, v, 1ULL << (32 + i), n, false);
			a[i].cnt = g_rdmsr(v, msr);
			g_wrmsr(v, l->fixed_ctrl, 0);
		} else {
			a[i].ctrl = g_wrmsr(v, l->fixed_ctrl, FIXED_CTRL_OS << (4 * i));
			a[i].gctl = g_wrmsr(v, l->global_ctrl, 1ULL << (32 + i));
			g_wrmsr(v, l->fixed_ctrl, 0);
			g_wrmsr(v, l->global_ctrl, 0);
		}
		g_wrmsr(v, msr, 0);
	}
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_i64(c->obs, "fixed_counters", p->fixed_contig);
	json_u64(c->obs, "fixed_bitmap", p->fixed_ecx);
	json_i64(c->obs, "version", p->version);
	json_workload(c, "workload", LOOP_PLAIN, n, 0, -1);
	json_arr_begin(c->obs, "counters");
	for (int i = 0; i < POSSIBLE_FIXED; i++) {
		uint32_t msr = l->fixed_base + (uint32_t)i;
		char name[48];

		snprintf(name, sizeof(name), "%s%d", l->fixed_name, i);
		json_obj_begin(c->obs, NULL);
		json_i64(c->obs, "index", i);
		json_bool(c->obs, "supported", p->fixed_mask >> i & 1);
		json_access(c->obs, "wrmsr", "wrmsr", msr, name, a[i].wr, true, test_val);
		json_access(c->obs, "rdmsr", "rdmsr", msr, name, a[i].rd, false, 0);
		json_access(c->obs, "rdpmc", "rdpmc", l->rdpmc_fixed_flag | (uint32_t)i, "RDPMC fixed", a[i].pmc,
			    false, 0);
		if (a[i].ctrl) {
			json_access(c->obs, "ctrl_wrmsr", "wrmsr", l->fixed_ctrl, "IA32_FIXED_CTR_CTRL", a[i].ctrl,
				    true, FIXED_CTRL_OS << (4 * i));
			json_access(c->obs, "global_ctrl_wrmsr", "wrmsr", l->global_ctrl, "IA32_PERF_GLOBAL_CTRL", a[i].gctl,
				    true, 1ULL << (32 + i));
		} else {
			json_null(c->obs, "ctrl_wrmsr");
			json_null(c->obs, "global_ctrl_wrmsr");
		}
		json_value_or_null(c->obs, "count", a[i].cnt);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

/* One counter of either kind, for probes that treat GP and fixed counters alike. */
struct any_ctr {
	const char *kind;
	int index;
	uint32_t msr;
	uint64_t enable;        /* its GLOBAL_CTRL bit */
};

static int all_counters(const struct probe_ctx *c, struct any_ctr *out, int max)
{
	const struct pmu_layout *l = c->l;
	int n = 0;

	for (int i = 0; i < gp_count(c) && n < max; i++)
		out[n++] = (struct any_ctr){ "gp", i, pmu_ctr_msr(l, i), 1ULL << i };
	for (int j = 0; l->fixed_base && j < c->pmu.fixed && j < (int)l->nfixed_events && n < max; j++)
		if (c->pmu.fixed_mask >> j & 1)
			out[n++] = (struct any_ctr){ "fixed", j, l->fixed_base + (uint32_t)j, 1ULL << (32 + j) };
	return n;
}

/* Program counter k to count (on) or not (off): GP instructions via EVTSEL.EN, fixed via its field. */
static void program(struct probe_ctx *c, struct vcpu *v, const struct any_ctr *k, bool on)
{
	const struct pmu_layout *l = c->l;

	if (!strcmp(k->kind, "gp"))
		g_wrmsr(v, pmu_sel_msr(l, k->index),
			pmu_selector(pmu_event(l, "instructions"), on ? EVTSEL_EN : 0));
	else
		g_wrmsr(v, l->fixed_ctrl, on ? (FIXED_CTRL_OS | FIXED_CTRL_USR) << (4 * k->index) : 0);
}

enum probe_status probe_counter_freeze(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	struct guest_cmd *rd[16][3];
	struct any_ctr k[16];
	enum probe_status ret = probe_need_counters(c, 1);
	struct vcpu *v;
	struct vm vm;
	int nk;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	nk = all_counters(c, k, 16);
	batch_begin(v);
	g_pmu_quiesce(c, v);
	for (int i = 0; i < nk; i++) {
		g_wrmsr(v, k[i].msr, 0);
		program(c, v, &k[i], true);
		g_measure(c, v, k[i].enable, n, false);
		rd[i][0] = g_rdmsr(v, k[i].msr);
		g_measure(c, v, 0, n, false);           /* GLOBAL_CTRL clear over the loop */
		rd[i][1] = g_rdmsr(v, k[i].msr);
		program(c, v, &k[i], false);
		g_measure(c, v, k[i].enable, n, false); /* global bit set, own enable clear */
		rd[i][2] = g_rdmsr(v, k[i].msr);
	}
	g_pmu_quiesce(c, v);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_workload(c, "workload", LOOP_PLAIN, n, 0, -1);
	json_arr_begin(c->obs, "counters");
	for (int i = 0; i < nk; i++) {
		json_obj_begin(c->obs, NULL);
		json_str(c->obs, "kind", k[i].kind);
		json_i64(c->obs, "index", k[i].index);
		json_value_or_null(c->obs, "counted", rd[i][0]);
		json_value_or_null(c->obs, "after_global_off", rd[i][1]);
		json_value_or_null(c->obs, "after_local_off", rd[i][2]);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_all_counters(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	struct guest_cmd *rd[16];
	struct any_ctr k[16];
	uint64_t fixed_ctrl = 0;
	enum probe_status ret = probe_need_counters(c, 1);
	struct vcpu *v;
	struct vm vm;
	int nk;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	nk = all_counters(c, k, 16);
	batch_begin(v);
	g_pmu_quiesce(c, v);
	for (int i = 0; i < nk; i++) {
		if (!strcmp(k[i].kind, "gp"))
			g_wrmsr(v, pmu_sel_msr(l, k[i].index),
				pmu_selector(pmu_event(l, k[i].index % 2 ? "branches" : "instructions"), EVTSEL_EN));
		else
			fixed_ctrl |= (FIXED_CTRL_OS | FIXED_CTRL_USR) << (4 * k[i].index);
	}
	if (fixed_ctrl)
		g_wrmsr(v, l->fixed_ctrl, fixed_ctrl);
	g_measure(c, v, pmu_global_mask(p, true), n, false);
	for (int i = 0; i < nk; i++)
		rd[i] = g_rdmsr(v, k[i].msr);
	g_pmu_quiesce(c, v);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_workload(c, "workload", LOOP_PLAIN, n, 0, -1);
	for (int fixed = 0; fixed < 2; fixed++) {
		json_arr_begin(c->obs, fixed ? "fixed" : "gp");
		for (int i = 0; i < nk; i++) {
			if (strcmp(k[i].kind, fixed ? "fixed" : "gp"))
				continue;
			json_obj_begin(c->obs, NULL);
			json_i64(c->obs, "counter", k[i].index);
			json_str(c->obs, "event", fixed ? l->fixed_events[k[i].index] :
				 k[i].index % 2 ? "branches" : "instructions");
			json_value_or_null(c->obs, "count", rd[i]);
			json_obj_end(c->obs);
		}
		json_arr_end(c->obs);
	}
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

/* GP counter 0 counts instructions with the given selector over the loop. */
static struct guest_cmd *count_gp0(struct probe_ctx *c, struct vcpu *v, uint64_t sel, uint64_t n)
{
	const struct pmu_layout *l = c->l;
	struct guest_cmd *rd;

	g_wrmsr(v, pmu_ctr_msr(l, 0), 0);
	g_wrmsr(v, pmu_sel_msr(l, 0), sel);
	g_measure(c, v, 1, n, false);
	rd = g_rdmsr(v, pmu_ctr_msr(l, 0));
	g_wrmsr(v, pmu_sel_msr(l, 0), 0);
	return rd;
}

enum probe_status probe_cmask(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	uint64_t sel = pmu_selector(pmu_event(c->l, "instructions"), EVTSEL_EN);
	struct guest_cmd *plain, *cmask;
	enum probe_status ret = probe_need_counters(c, 1);
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	batch_begin(v);
	g_pmu_quiesce(c, v);
	plain = count_gp0(c, v, sel, n);
	/* kvm-unit-tests check_cmask: CMASK=2 counts only cycles retiring >= 2 instructions. */
	cmask = count_gp0(c, v, sel | 2ULL << EVTSEL_CMASK_SHIFT, n);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_workload(c, "workload", LOOP_PLAIN, n, 0, -1);
	json_i64(c->obs, "cmask", 2);
	json_value_or_null(c->obs, "count_plain", plain);
	json_value_or_null(c->obs, "count_cmask", cmask);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

/* GP counter 0 with sel over n iterations of the CPL3 loop (OP_MEASURE_USER); copied out. */
static struct reading count_gp0_user(struct probe_ctx *c, struct vcpu *v, uint64_t sel, uint64_t n,
				     struct vm *vm, enum probe_status *ret)
{
	const struct pmu_layout *l = c->l;
	struct guest_cmd *rd, *m;

	batch_begin(v);
	g_wrmsr(v, pmu_ctr_msr(l, 0), 0);
	g_wrmsr(v, pmu_sel_msr(l, 0), sel);
	m = batch_add(v, OP_MEASURE_USER, l->global_ctrl, 1, 0, n, 0);
	rd = g_rdmsr(v, pmu_ctr_msr(l, 0));
	g_wrmsr(v, pmu_sel_msr(l, 0), 0);
	if (batch_run(v, NULL)) {
		*ret = probe_fail(c, "%s", vm->err);
		return (struct reading){ false, 0 };
	}
	return m->vector < 0 ? reading_of(rd) : (struct reading){ false, 0 };
}

#define MSR_EFER   0xc0000080
#define EFER_SVME  (1ULL << 12)
#define GUEST_EFER 0x500ULL     /* LME | LMA, as lib/vm.c sets it */

/*
 * AMD Host-Only/Guest-Only (svm_pmu_host_guest_test.c, without its L2 steps: this guest runs no
 * nested VM): PMCs 0-3 count instructions with neither bit, Guest-Only, Host-Only and both.
 * EFER.SVME=0: only the first counts; SVME=1 (L1 is "host mode"): all but Guest-Only; an event
 * filter denying the event stops all; clearing Host-Only of the "both" counter stops it.
 */
static void json_host_guest_only(struct probe_ctx *c, struct vcpu *v, struct vm *vm, uint64_t n,
				 enum probe_status *ret)
{
	static const char *const steps[] = { "svme0", "svme1", "deny", "allow", "both_minus_host_only",
					     "both_restored", "svme0_again" };
	const struct pmu_layout *l = c->l;
	uint64_t base = pmu_selector(pmu_event(l, "instructions"), EVTSEL_EN), key;
	struct cpuid_view view = kvm_cpuid_view(c->caps->kvm_cpuid);
	uint32_t r[4] = { 0 };

	if (!l->guest_only || c->pmu.gp < 4) {
		json_null(c->obs, "host_guest_only");
		return;
	}
	key = pmu_filter_key(pmu_event(l, "instructions"));
	json_obj_begin(c->obs, "host_guest_only");
	json_bool(c->obs, "guest_svm", c->caps->kvm_cpuid && view.get(&view, 0x80000001, 0, r) == 0 &&
		  (r[2] >> 2 & 1));
	json_arr_begin(c->obs, "pmcs");
	json_str(c->obs, NULL, "none");
	json_str(c->obs, NULL, "guest_only");
	json_str(c->obs, NULL, "host_only");
	json_str(c->obs, NULL, "both");
	json_arr_end(c->obs);
	json_arr_begin(c->obs, "steps");
	for (size_t s = 0; s < sizeof(steps) / sizeof(steps[0]) && *ret == PROBE_OK; s++) {
		bool svme = s >= 1 && s <= 5;
		const char *filter = s == 2 ? "deny" : s == 3 ? "allow" : NULL;
		struct guest_cmd *efer, *rd[4];
		struct reading cnt[4];
		int efer_vector;

		if (filter)
			set_filter(vm, s == 2 ? KVM_PMU_EVENT_DENY : KVM_PMU_EVENT_ALLOW, 0, 0, &key, 1);
		batch_begin(v);
		g_pmu_quiesce(c, v);
		efer = g_wrmsr(v, MSR_EFER, GUEST_EFER | (svme ? EFER_SVME : 0));
		for (int i = 0; i < 4; i++) {
			uint64_t sel = base | (i & 1 ? l->guest_only : 0) | (i & 2 ? l->host_only : 0);

			if (i == 3 && s == 4)
				sel &= ~l->host_only;
			g_wrmsr(v, pmu_sel_msr(l, i), sel);
		}
		g_measure(c, v, 0xf, n, false);
		for (int i = 0; i < 4; i++)
			rd[i] = g_rdmsr(v, pmu_ctr_msr(l, i));
		g_pmu_quiesce(c, v);
		g_wrmsr(v, MSR_EFER, GUEST_EFER);
		if (batch_run(v, NULL))
			*ret = probe_fail(c, "%s", vm->err);
		efer_vector = efer->vector;
		for (int i = 0; i < 4; i++)
			cnt[i] = reading_of(rd[i]);
		json_obj_begin(c->obs, NULL);
		json_str(c->obs, "step", steps[s]);
		json_i64(c->obs, "efer_svme", svme);
		json_opt_i64(c->obs, "efer_vector", efer_vector);
		if (filter)
			json_str(c->obs, "filter", filter);
		else
			json_null(c->obs, "filter");
		json_arr_begin(c->obs, "counts");
		for (int i = 0; i < 4; i++)
			json_reading(c->obs, NULL, cnt[i]);
		json_arr_end(c->obs);
		json_obj_end(c->obs);
	}
	set_filter(vm, KVM_PMU_EVENT_DENY, 0, 0, NULL, 0);
	json_arr_end(c->obs);
	json_obj_end(c->obs);
}

enum probe_status probe_privilege(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	uint64_t base = pmu_selector(pmu_event(c->l, "instructions"), EVTSEL_EN) & ~(EVTSEL_OS | EVTSEL_USR);
	const uint64_t modes[3] = { EVTSEL_USR, EVTSEL_OS, EVTSEL_OS | EVTSEL_USR };
	static const char *const names[3] = { "usr", "os", "both" };
	struct reading user[3][2];
	struct guest_cmd *usr, *os, *both;
	enum probe_status ret = probe_need_counters(c, 1);
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	batch_begin(v);
	g_pmu_quiesce(c, v);
	usr = count_gp0(c, v, base | EVTSEL_USR, n);
	os = count_gp0(c, v, base | EVTSEL_OS, n);
	both = count_gp0(c, v, base | EVTSEL_OS | EVTSEL_USR, n);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_workload(c, "workload", LOOP_PLAIN, n, 0, -1);
	json_i64(c->obs, "cpl", 0);
	json_obj_begin(c->obs, "counts");
	json_value_or_null(c->obs, "usr", usr);
	json_value_or_null(c->obs, "os", os);
	json_value_or_null(c->obs, "both", both);
	json_obj_end(c->obs);
	/* The same three filters over a CPL3 loop of n and of 2n iterations (2 instructions each). */
	for (int m = 0; m < 3 && ret == PROBE_OK; m++)
		for (int k = 0; k < 2 && ret == PROBE_OK; k++)
			user[m][k] = count_gp0_user(c, v, base | modes[m], n << k, &vm, &ret);
	json_obj_begin(c->obs, "user_loop");
	json_arr_begin(c->obs, "iterations");
	json_u64(c->obs, NULL, n);
	json_u64(c->obs, NULL, 2 * n);
	json_arr_end(c->obs);
	json_i64(c->obs, "insns_per_iter", MEASURE_USER_INSNS_PER_ITER);
	json_obj_begin(c->obs, "counts");
	for (int m = 0; m < 3; m++) {
		json_arr_begin(c->obs, names[m]);
		for (int k = 0; k < 2; k++)
			json_reading(c->obs, NULL, ret == PROBE_OK ? user[m][k] : (struct reading){ false, 0 });
		json_arr_end(c->obs);
	}
	json_obj_end(c->obs);
	json_obj_end(c->obs);
	if (ret == PROBE_OK)
		json_host_guest_only(c, v, &vm, n, &ret);
	else
		json_null(c->obs, "host_guest_only");
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_running_write(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	/* -1 through the full-width alias, or 32 bits sign-extended through the legacy one. */
	bool fw = probe_full_width(c) || !l->legacy_ctr_base;
	uint32_t ctr = fw ? pmu_ctr_msr(l, 0) : l->legacy_ctr_base;
	uint64_t minus_one = fw ? width_mask(p->gp_width) : 0xffffffffULL;
	struct guest_cmd *zero, *wrapped, *status;
	enum probe_status ret = probe_need_counters(c, 1);
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	batch_begin(v);
	g_pmu_quiesce(c, v);
	g_wrmsr(v, pmu_sel_msr(l, 0), pmu_selector(pmu_event(l, "instructions"), EVTSEL_EN));
	g_wrmsr(v, l->global_ctrl, 1);
	/* While it runs: write 0 to the counter, loop, write 0 again; what remains is the tail. */
	batch_add(v, OP_MEASURE, ctr, 0, 0, n, MEASURE_LOOP_PLAIN);
	g_wrmsr(v, l->global_ctrl, 0);
	zero = g_rdmsr(v, pmu_ctr_msr(l, 0));
	/* -1 written to the running counter, then the loop wraps it (check_running_counter_wrmsr). */
	g_wrmsr(v, pmu_ctr_msr(l, 0), 0);
	g_wrmsr(v, l->global_status_clr, pmu_global_mask(p, true));
	g_wrmsr(v, l->global_ctrl, 1);
	g_wrmsr(v, ctr, minus_one);
	g_measure(c, v, 1, n, false);
	wrapped = g_rdmsr(v, pmu_ctr_msr(l, 0));
	status = g_rdmsr(v, l->global_status);
	g_pmu_quiesce(c, v);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_workload(c, "workload", LOOP_PLAIN, n, 0, -1);
	json_value_or_null(c->obs, "after_write_zero", zero);
	json_obj_begin(c->obs, "from_minus_one");
	json_u64(c->obs, "written", minus_one);
	json_value_or_null(c->obs, "count", wrapped);
	json_value_or_null(c->obs, "global_status", status);
	json_obj_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_legacy_k7(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	uint64_t sel = pmu_selector(pmu_event(l, "instructions"), 0);
	struct { uint64_t written; struct guest_cmd *wr, *rd, *f15h, *pmc, *selw, *selr, *cnt; } a[4];
	enum probe_status ret = PROBE_OK;
	struct vcpu *v;
	struct vm vm;
	int nk = (int)l->k7_count;

	if (!nk)
		return probe_unsupported(c, "%s has no K7 legacy counter MSRs", l->vendor);
	if (start(c, &vm, &v))
		return PROBE_ERROR;
	batch_begin(v);
	if (p->has_global)
		g_wrmsr(v, l->global_ctrl, 0);
	for (int i = 0; i < nk; i++) {
		a[i].written = 0x12345000ULL + (uint64_t)i;
		a[i].wr = g_wrmsr(v, l->k7_ctr_base + (uint32_t)i, a[i].written);
		a[i].rd = g_rdmsr(v, l->k7_ctr_base + (uint32_t)i);
		a[i].f15h = g_rdmsr(v, pmu_ctr_msr(l, i));
		a[i].pmc = g_rdpmc(v, (uint32_t)i);
		a[i].selw = g_wrmsr(v, l->k7_sel_base + (uint32_t)i, sel);
		a[i].selr = g_rdmsr(v, pmu_sel_msr(l, i));
		/* Count through K7 alone: the window is the K7 selector's enable bit. */
		g_wrmsr(v, l->k7_ctr_base + (uint32_t)i, 0);
		if (p->has_global)
			g_wrmsr(v, l->global_ctrl, 1ULL << i);
		batch_add(v, OP_MEASURE, l->k7_sel_base + (uint32_t)i, sel | EVTSEL_EN, sel, n, MEASURE_LOOP_PLAIN);
		a[i].cnt = g_rdmsr(v, l->k7_ctr_base + (uint32_t)i);
		if (p->has_global)
			g_wrmsr(v, l->global_ctrl, 0);
		g_wrmsr(v, l->k7_sel_base + (uint32_t)i, 0);
		g_wrmsr(v, l->k7_ctr_base + (uint32_t)i, 0);
	}
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_workload(c, "workload", LOOP_PLAIN, n, 0, -1);
	json_arr_begin(c->obs, "counters");
	for (int i = 0; i < nk; i++) {
		char name[32], fname[48];

		snprintf(name, sizeof(name), "MSR_K7_PERFCTR%d", i);
		snprintf(fname, sizeof(fname), "%s%d", l->ctr_name, i);
		json_obj_begin(c->obs, NULL);
		json_i64(c->obs, "index", i);
		json_u64(c->obs, "written", a[i].written);
		json_access(c->obs, "k7_wrmsr", "wrmsr", l->k7_ctr_base + (uint32_t)i, name, a[i].wr, true,
			    a[i].written);
		json_access(c->obs, "k7_rdmsr", "rdmsr", l->k7_ctr_base + (uint32_t)i, name, a[i].rd, false, 0);
		json_access(c->obs, "f15h_rdmsr", "rdmsr", pmu_ctr_msr(l, i), fname, a[i].f15h, false, 0);
		json_access(c->obs, "rdpmc", "rdpmc", (uint32_t)i, "RDPMC", a[i].pmc, false, 0);
		snprintf(name, sizeof(name), "MSR_K7_EVNTSEL%d", i);
		json_access(c->obs, "k7_sel_wrmsr", "wrmsr", l->k7_sel_base + (uint32_t)i, name, a[i].selw, true, sel);
		json_value_or_null(c->obs, "f15h_sel_read", a[i].selr);
		json_value_or_null(c->obs, "count", a[i].cnt);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}
