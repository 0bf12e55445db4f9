// SPDX-License-Identifier: GPL-2.0
/*
 * Isolation probes: the VMM itself (selftest), guest-only counting, host perf vs guest,
 * perf/KVM mutual exclusion, state left by a previous VM, cross-context leaks, counters the guest
 * was not given, and the per-VM PMU opt-out.
 */
#include <errno.h>
#include <stdint.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "perf.h"
#include "probes.h"

static const struct vm_opts default_opts = { .irqchip = true };


static const struct pmu_event *event(struct probe_ctx *c, const char *name)
{
	return pmu_event(c->l, name);
}

enum probe_status probe_selftest(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	struct run_stats st = { 0 };
	struct guest_cmd *cmd, *user;
	struct vcpu *v;
	struct vm vm;
	enum probe_status ret = PROBE_OK;
	bool user_ok = false;

	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	batch_begin(v);
	cmd = batch_add(v, OP_SELFTEST, n, 0, 0, 0, 0);
	if (batch_run(v, &st))
		ret = probe_fail(c, "%s", vm.err);
	json_u64(c->obs, "iterations", n);
	json_u64(c->obs, "vm_exits", st.ticks);
	json_u64(c->obs, "guest_sum", cmd->out[0]);
	json_u64(c->obs, "expected_sum", n * (n - 1) / 2);
	if (ret == PROBE_OK) {
		/* To CPL3 and back (IRETQ, a user loop, INT through a DPL-3 gate): the privilege probe's path. */
		batch_begin(v);
		user = batch_add(v, OP_MEASURE_USER, 0, 0, 0, 10, 0);
		if (batch_run(v, NULL))
			ret = probe_fail(c, "CPL3 round trip: %s", vm.err);
		else
			user_ok = user->vector < 0;
	}
	json_bool(c->obs, "user_round_trip", user_ok);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_guest_count(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	struct guest_cmd *insn = NULL, *br = NULL;
	struct run_stats st = { 0 };
	int64_t kvm_exits = -1;
	enum probe_status ret;
	struct vcpu *v;
	struct vm vm;

	ret = probe_need_counters(c, 2);
	if (ret != PROBE_OK)
		return ret;
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	batch_begin(v);
	g_pmu_quiesce(c, v);
	g_wrmsr(v, pmu_sel_msr(l, 0), pmu_selector(event(c, "instructions"), EVTSEL_EN));
	g_wrmsr(v, pmu_sel_msr(l, 1), pmu_selector(event(c, "branches"), EVTSEL_EN));
	if (run_measured(c, v, 0x3, n, LOOP_EXIT_EACH, &st, &kvm_exits) == 0) {
		insn = g_rdmsr(v, pmu_ctr_msr(l, 0));
		br = g_rdmsr(v, pmu_ctr_msr(l, 1));
		g_pmu_quiesce(c, v);
		if (batch_run(v, NULL))
			insn = br = NULL;
	}
	if (!insn)
		ret = probe_fail(c, "%s", vm.err);
	json_workload(c, "workload", LOOP_EXIT_EACH, n, st.ticks, kvm_exits);
	json_obj_begin(c->obs, "counts");
	json_opt_i64(c->obs, "instructions", insn && insn->vector < 0 ? (int64_t)(insn->out[0] & INT64_MAX) : -1);
	json_opt_i64(c->obs, "branches", br && br->vector < 0 ? (int64_t)(br->out[0] & INT64_MAX) : -1);
	json_obj_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_host_excludes_guest(struct probe_ctx *c)
{
	/* Two guest loops differing 10x in length but with the same number of exits. */
	const uint64_t exits = 100;
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	uint64_t small = n / (2 * exits) ? n / (2 * exits) : 1;
	uint64_t inner[3] = { small, 10 * small, small };
	/* Run 3: run 1 with 10x the exits, for the host event's own count per VM-exit. */
	uint64_t nexits[3] = { exits, exits, 10 * exits };
	enum probe_status ret = PROBE_OK;
	bool exclude_kernel = false;
	struct vcpu *v;
	struct vm vm;
	int fd = -1, e;

	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	/* Count the vCPU thread's host work (kernel included, like `perf stat` as root). */
	e = perf_open_instructions(true, false, &fd);
	if (e == EACCES || e == EPERM) {
		exclude_kernel = true;
		e = perf_open_instructions(true, true, &fd);
	}
	json_i64(c->obs, "perf_open_errno", e);
	json_bool(c->obs, "exclude_kernel", exclude_kernel);
	json_arr_begin(c->obs, "runs");
	for (int r = 0; r < 3 && ret == PROBE_OK; r++) {
		struct run_stats st = { 0 };
		int64_t count = -1;

		batch_begin(v);
		batch_add(v, OP_WORK, inner[r], nexits[r], 0, 0, 0);
		if (fd >= 0)
			perf_start(fd);
		if (batch_run(v, &st))
			ret = probe_fail(c, "%s", vm.err);
		if (fd >= 0)
			count = perf_stop_read(fd);
		json_obj_begin(c->obs, NULL);
		json_u64(c->obs, "guest_instructions", WORK_INSNS(inner[r], nexits[r]));
		json_opt_i64(c->obs, "host_count", count);
		json_u64(c->obs, "vm_exits", st.ticks);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	if (fd >= 0)
		close(fd);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_exclusivity(struct probe_ctx *c)
{
	struct vcpu *v;
	struct vm vm;
	int fd, e_without, e_with, e_before, e_vcpu = -1;

	/* A VM with an in-kernel LAPIC gets its mediated PMU at the first KVM_CREATE_VCPU. */
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	e_without = perf_open_instructions(false, false, &fd);
	if (fd >= 0)
		close(fd);
	e_with = perf_open_instructions(true, false, &fd);
	if (fd >= 0)
		close(fd);
	vm_destroy(&vm);

	/* No mediated VM now: an include-guest event must open, then vCPU creation must fail. */
	e_before = perf_open_instructions(false, false, &fd);
	if (fd >= 0) {
		struct vm vm2;
		struct vcpu *v2;

		struct vm_opts o = probe_opts(c);

		if (vm_create(&vm2, &o)) {
			close(fd);
			vm_destroy(&vm2);
			return probe_fail(c, "%s", vm2.err);
		}
		e_vcpu = vcpu_add(&vm2, 0, &v2);
		vm_destroy(&vm2);
		close(fd);
	}
	json_i64(c->obs, "event_without_exclude_guest_errno", e_without);
	json_i64(c->obs, "event_with_exclude_guest_errno", e_with);
	json_opt_i64(c->obs, "vcpu_create_errno_while_event", e_vcpu);
	json_i64(c->obs, "event_open_errno_without_vm", e_before);
	return PROBE_OK;
}

static void json_read(struct json *j, const struct guest_cmd *cmd)
{
	if (cmd->vector >= 0)
		json_null(j, NULL);
	else
		json_u64(j, NULL, cmd->out[0]);
}

enum probe_status probe_fresh_state(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	struct guest_cmd *ctr[8] = { 0 }, *sel[8] = { 0 }, *fix[8] = { 0 }, *fctrl = NULL, *status = NULL;
	uint64_t fixed_ctrl_all = 0;
	enum probe_status ret;
	struct vcpu *v;
	struct vm vm;
	int gp = p->gp > 8 ? 8 : p->gp;

	ret = probe_need_counters(c, 1);
	if (ret != PROBE_OK)
		return ret;

	/* VM 1 dirties every register it has, overflows counter 0, and is destroyed. */
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	batch_begin(v);
	g_pmu_quiesce(c, v);
	for (int i = 0; i < gp; i++) {
		g_wrmsr(v, pmu_sel_msr(l, i), pmu_selector(event(c, "instructions"), EVTSEL_EN));
		g_wrmsr(v, pmu_ctr_msr(l, i), i ? 0x1000ULL * (uint64_t)i : width_mask(p->gp_width) - 64);
	}
	for (int j = 0; j < p->fixed && j < 8; j++)
		if (p->fixed_mask >> j & 1)
			fixed_ctrl_all |= (FIXED_CTRL_OS | FIXED_CTRL_USR) << (4 * j);
	if (l->fixed_ctrl && fixed_ctrl_all)
		g_wrmsr(v, l->fixed_ctrl, fixed_ctrl_all);
	g_measure(c, v, pmu_global_mask(p, true), 1000, false);
	g_wrmsr(v, l->global_ctrl, pmu_global_mask(p, true));   /* leave everything running */
	if (batch_run(v, NULL)) {
		probe_fail(c, "dirtying VM: %s", vm.err);
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	vm_destroy(&vm);

	/* VM 2 reads everything back before programming anything. */
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	batch_begin(v);
	for (int i = 0; i < gp; i++) {
		ctr[i] = g_rdmsr(v, pmu_ctr_msr(l, i));
		sel[i] = g_rdmsr(v, pmu_sel_msr(l, i));
	}
	for (int j = 0; l->fixed_base && j < p->fixed && j < 8; j++)
		if (p->fixed_mask >> j & 1)
			fix[j] = g_rdmsr(v, l->fixed_base + (uint32_t)j);
	if (l->fixed_ctrl)
		fctrl = g_rdmsr(v, l->fixed_ctrl);
	if (p->has_global)
		status = g_rdmsr(v, l->global_status);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);

	json_arr_begin(c->obs, "gp_counters");
	for (int i = 0; i < gp; i++)
		json_read(c->obs, ctr[i]);
	json_arr_end(c->obs);
	json_arr_begin(c->obs, "gp_selectors");
	for (int i = 0; i < gp; i++)
		json_read(c->obs, sel[i]);
	json_arr_end(c->obs);
	json_arr_begin(c->obs, "fixed_counters");
	for (int j = 0; j < 8; j++)
		if (fix[j])
			json_read(c->obs, fix[j]);
	json_arr_end(c->obs);
	if (fctrl && fctrl->vector < 0)
		json_u64(c->obs, "fixed_ctrl", fctrl->out[0]);
	else
		json_null(c->obs, "fixed_ctrl");
	if (status && status->vector < 0)
		json_u64(c->obs, "global_status", status->out[0]);
	else
		json_null(c->obs, "global_status");
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

#define MAX_DISTINCT 64

struct context {
	struct vm vm;
	struct vcpu *v;
	uint64_t seed;
	uint64_t seen[MAX_DISTINCT];
	int nseen;
	bool overflowed;
};

static void remember(struct context *x, uint64_t val)
{
	for (int i = 0; i < x->nseen; i++)
		if (x->seen[i] == val)
			return;
	if (x->nseen < MAX_DISTINCT)
		x->seen[x->nseen++] = val;
	else
		x->overflowed = true;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

enum probe_status probe_cross_context(struct probe_ctx *c)
{
	uint64_t rounds = (uint64_t)arg_int(c, "rounds");
	bool per_vm = !strcmp(arg_str(c, "kind"), "vm");
	const struct pmu_layout *l = c->l;
	struct context *x = calloc(2, sizeof(*x));
	enum probe_status ret;
	int cpu = c->cpu, e;

	if (!x)
		return probe_fail(c, "out of memory");
	/* calloc leaves fd 0: an early exit must not close stdin (finding 17). */
	for (int i = 0; i < 2; i++)
		x[i].vm.fd = x[i].vm.kvm_fd = -1;
	ret = probe_need_counters(c, 1);
	if (ret != PROBE_OK)
		goto out_free;
	/* Both contexts must share one physical PMU: pin to one CPU (the current one by default). */
	if (cpu < 0) {
		cpu = sched_getcpu();
		e = cpu < 0 ? errno : pin_to_cpu(cpu);
		if (e) {
			ret = probe_fail(c, "cannot pin to a CPU: %s", strerror(e));
			goto out_free;
		}
	}

	for (int i = 0; i < 2; i++) {
		x[i].seed = ((0x1111ULL * (uint64_t)(i + 1)) << 32 | 0x5eed0000ULL | (uint64_t)i) &
			    width_mask(c->pmu.gp_width);
		if (per_vm || i == 0) {
			struct vm_opts o = probe_opts(c);

			if (vm_create(&x[i].vm, &o)) {
				ret = probe_fail(c, "%s", x[i].vm.err);
				goto out;
			}
		}
		{
			struct vm *vm = per_vm ? &x[i].vm : &x[0].vm;

			e = vcpu_add(vm, per_vm ? 0 : i, &x[i].v);
			if (e) {
				ret = probe_fail(c, "%s", vm->err);
				goto out;
			}
		}
		/* Counter 0 holds the seed; it is disabled, so only a leak can change it. */
		batch_begin(x[i].v);
		g_pmu_quiesce(c, x[i].v);
		g_wrmsr(x[i].v, pmu_ctr_msr(l, 0), x[i].seed);
		if (batch_run(x[i].v, NULL)) {
			ret = probe_fail(c, "%s", x[i].v->vm->err);
			goto out;
		}
	}
	for (uint64_t r = 0; r < rounds; r++) {
		for (int i = 0; i < 2; i++) {
			struct guest_cmd *rd;

			batch_begin(x[i].v);
			rd = g_rdmsr(x[i].v, pmu_ctr_msr(l, 0));
			if (batch_run(x[i].v, NULL)) {
				ret = probe_fail(c, "round %llu: %s", (unsigned long long)r, x[i].v->vm->err);
				goto out;
			}
			if (rd->vector < 0)
				remember(&x[i], rd->out[0]);
		}
	}
	json_str(c->obs, "kind", per_vm ? "vm" : "vcpu");
	json_u64(c->obs, "rounds", rounds);
	json_i64(c->obs, "cpu", cpu);
	json_arr_begin(c->obs, "contexts");
	for (int i = 0; i < 2; i++) {
		qsort(x[i].seen, (size_t)x[i].nseen, sizeof(x[i].seen[0]), cmp_u64);
		json_obj_begin(c->obs, NULL);
		json_i64(c->obs, "id", i);
		json_u64(c->obs, "seed", x[i].seed);
		json_arr_begin(c->obs, "values_read");
		for (int k = 0; k < x[i].nseen; k++)
			json_u64(c->obs, NULL, x[i].seen[k]);
		json_arr_end(c->obs);
		json_bool(c->obs, "values_truncated", x[i].overflowed);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
out:
	vm_destroy(&x[0].vm);
	if (per_vm)
		vm_destroy(&x[1].vm);
out_free:
	free(x);
	return ret;
}

struct access_plan {
	const char *op;
	uint32_t target;
	char name[48];
	const char *quirk;
	struct guest_cmd *cmd;
};

static void plan(struct access_plan *a, int *n, struct vcpu *v, const char *op, uint32_t target,
		 const char *quirk, const char *fmt_name, int idx)
{
	struct access_plan *p = &a[(*n)++];

	p->op = op;
	p->target = target;
	p->quirk = quirk;
	snprintf(p->name, sizeof(p->name), "%s%d", fmt_name, idx);
	if (!strcmp(op, "rdmsr"))
		p->cmd = g_rdmsr(v, target);
	else if (!strcmp(op, "wrmsr"))
		p->cmd = g_wrmsr(v, target, 0);
	else
		p->cmd = g_rdpmc(v, target);
}

enum probe_status probe_unexposed(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	struct access_plan acc[24];
	struct guest_cmd *fast;
	enum probe_status ret = PROBE_OK;
	int n = 0, gp = p->gp, m = p->fixed;
	bool full_width = probe_full_width(c);   /* the guest's PERF_CAPABILITIES, not the host's */
	static const char *const ops[] = { "rdmsr", "wrmsr" };
	struct vcpu *v;
	struct vm vm;

	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	batch_begin(v);
	for (int o = 0; o < 2; o++) {
		if (l->legacy_ctr_base) {
			/* KVM keeps MSR_P6_PERFCTR0/1 readable (0) and writable (dropped) for old guests. */
			for (int i = gp; i < (int)l->p6_quirk_count; i++)
				plan(acc, &n, v, ops[o], l->legacy_ctr_base + (uint32_t)i, "p6_perfctr",
				     "MSR_P6_PERFCTR", i);
			if (gp >= (int)l->p6_quirk_count)
				plan(acc, &n, v, ops[o], l->legacy_ctr_base + (uint32_t)gp, NULL,
				     l->legacy_ctr_name, gp);
		}
		if (full_width)
			plan(acc, &n, v, ops[o], pmu_ctr_msr(l, gp), NULL, l->ctr_name, gp);
		plan(acc, &n, v, ops[o], pmu_sel_msr(l, gp), NULL, l->sel_name, gp);
		if (l->fixed_base)
			plan(acc, &n, v, ops[o], l->fixed_base + (uint32_t)m, NULL, l->fixed_name, m);
	}
	/*
	 * RDPMC(64), as kvm-unit-tests x86/pmu.c: never index = #counters, which on Zen reads a
	 * data-fabric counter (arch/x86/events/amd/uncore.c RDPMC_BASE_NB 6; finding 6).
	 */
	plan(acc, &n, v, "rdpmc", 64, NULL, "RDPMC ", 64);
	if (l->rdpmc_fixed_flag)
		plan(acc, &n, v, "rdpmc", l->rdpmc_fixed_flag | (uint32_t)m, NULL, "RDPMC fixed ", m);
	fast = g_rdpmc(v, RDPMC_FAST);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);

	json_i64(c->obs, "gp_counters", gp);
	json_i64(c->obs, "fixed_counters", __builtin_popcount(p->fixed_mask));
	json_arr_begin(c->obs, "accesses");
	for (int i = 0; i < n; i++) {
		json_obj_begin(c->obs, NULL);
		json_str(c->obs, "op", acc[i].op);
		json_u64(c->obs, "target", acc[i].target);
		json_str(c->obs, "name", acc[i].name);
		json_opt_i64(c->obs, "vector", acc[i].cmd->vector);
		if (acc[i].cmd->vector < 0 && strcmp(acc[i].op, "wrmsr"))
			json_u64(c->obs, "value", acc[i].cmd->out[0]);
		else
			json_null(c->obs, "value");
		if (acc[i].quirk)
			json_str(c->obs, "quirk", acc[i].quirk);
		else
			json_null(c->obs, "quirk");
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_obj_begin(c->obs, "fast_rdpmc");
	json_opt_i64(c->obs, "vector", fast->vector);
	json_obj_end(c->obs);
	vm_destroy(&vm);
	return ret;
}

/* A CPUID view over leaves the guest executed itself (OP_CPUID). */
static const uint32_t guest_leaves[] = { 0, 1, 7, 0xa, 0x80000000, 0x80000001, 0x80000022 };
#define NLEAVES (sizeof(guest_leaves) / sizeof(guest_leaves[0]))

static int guest_view_get(const struct cpuid_view *view, uint32_t leaf, uint32_t sub, uint32_t r[4])
{
	struct guest_cmd *const *cmds = view->table;

	(void)sub;
	for (size_t i = 0; i < NLEAVES; i++) {
		if (guest_leaves[i] != leaf)
			continue;
		for (int k = 0; k < 4; k++)
			r[k] = (uint32_t)cmds[i]->out[k];
		return 0;
	}
	return -1;
}

enum probe_status probe_pmu_disabled(struct probe_ctx *c)
{
	const struct vm_opts o = { .irqchip = true, .pmu_disable = true };
	struct guest_cmd *leaves[NLEAVES], *access;
	struct cpuid_view gv = { .get = guest_view_get, .table = leaves };
	enum probe_status ret = PROBE_OK;
	struct pmu_info guest;
	struct vcpu *v;
	struct vm vm;

	if (probe_vm(c, &vm, &v, &o)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	batch_begin(v);
	for (size_t i = 0; i < NLEAVES; i++)
		leaves[i] = batch_add(v, OP_CPUID, guest_leaves[i], 0, 0, 0, 0);
	access = g_rdmsr(v, pmu_ctr_msr(c->l, 0));
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	c->l->decode(&gv, &guest);

	json_i64(c->obs, "cap_disable_errno", vm.pmu_cap_errno);
	json_i64(c->obs, "guest_pmu_version", guest.version);
	json_i64(c->obs, "guest_gp_counters", guest.gp);
	json_opt_i64(c->obs, "counter_access_vector", access->vector);
	json_i64(c->obs, "cap_after_vcpu_errno", vm_pmu_cap_disable(&vm));
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

struct rw_access {
	struct guest_cmd *wr, *rd, *pmc, *sel, *clr;
};

enum probe_status probe_hidden_counters(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	/* The full-width alias only with FW_WRITES, like guest_test_gp_counters(). */
	bool fw = probe_full_width(c) || !l->legacy_ctr_base;
	uint32_t base = fw ? l->ctr_base : l->legacy_ctr_base, stride = fw ? l->stride : 1;
	const char *name = fw ? l->ctr_name : l->legacy_ctr_name;
	const uint64_t test_val = 0xffff;
	struct rw_access a[8];
	struct guest_cmd *reset = NULL;
	enum probe_status ret = PROBE_OK;
	int possible = (int)l->max_gp > 8 ? 8 : (int)l->max_gp;
	struct vcpu *v;
	struct vm vm;

	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	batch_begin(v);
	if (p->has_global)
		reset = g_rdmsr(v, l->global_ctrl);    /* the first access of a fresh vCPU */
	for (int i = 0; i < possible; i++) {
		uint32_t msr = base + stride * (uint32_t)i;

		a[i].wr = g_wrmsr(v, msr, test_val);
		a[i].rd = g_rdmsr(v, msr);
		a[i].pmc = g_rdpmc(v, (uint32_t)i);
		a[i].sel = g_wrmsr(v, pmu_sel_msr(l, i), 0);
		a[i].clr = g_wrmsr(v, msr, 0);
	}
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);

	json_i64(c->obs, "gp_counters", p->gp);
	json_i64(c->obs, "possible", possible);
	json_str(c->obs, "base", fw ? "full_width" : "legacy");
	if (reset && reset->vector < 0)
		json_u64(c->obs, "global_ctrl_reset", reset->out[0]);
	else
		json_null(c->obs, "global_ctrl_reset");
	json_arr_begin(c->obs, "counters");
	for (int i = 0; i < possible; i++) {
		uint32_t msr = base + stride * (uint32_t)i;
		char n[48], sn[48];
		bool exposed = i < p->gp;

		snprintf(n, sizeof(n), "%s%d", name, i);
		snprintf(sn, sizeof(sn), "%s%d", l->sel_name, i);
		json_obj_begin(c->obs, NULL);
		json_i64(c->obs, "index", i);
		json_bool(c->obs, "exposed", exposed);
		/* KVM keeps MSR_P6_PERFCTR0/1 readable (0) and writable (dropped) for old guests. */
		if (!exposed && !fw && i < (int)l->p6_quirk_count)
			json_str(c->obs, "quirk", "p6_perfctr");
		else
			json_null(c->obs, "quirk");
		json_access(c->obs, "wrmsr", "wrmsr", msr, n, a[i].wr, true, test_val);
		json_access(c->obs, "rdmsr", "rdmsr", msr, n, a[i].rd, false, 0);
		json_access(c->obs, "rdpmc", "rdpmc", (uint32_t)i, "RDPMC", a[i].pmc, false, 0);
		json_access(c->obs, "selector_wrmsr", "wrmsr", pmu_sel_msr(l, i), sn, a[i].sel, true, 0);
		json_access(c->obs, "clear", "wrmsr", msr, n, a[i].clr, true, 0);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

static void json_leaf(struct json *j, const char *key, const struct guest_cmd *cmd, bool present)
{
	if (!present) {
		json_null(j, key);
		return;
	}
	json_arr_begin(j, key);
	for (int k = 0; k < 4; k++)
		json_u64(j, NULL, (uint32_t)cmd->out[k]);
	json_arr_end(j);
}

static size_t leaf_index(uint32_t leaf)
{
	for (size_t i = 0; i < NLEAVES; i++)
		if (guest_leaves[i] == leaf)
			return i;
	return 0;
}

enum probe_status probe_pmu_enum(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	struct guest_cmd *leaves[NLEAVES], *caps_rd = NULL;
	struct cpuid_view gv = { .get = guest_view_get, .table = leaves };
	enum probe_status ret = PROBE_OK;
	int64_t before = -1, after = -1, np_read = -1;
	int set_errno = -1, np_zero = -1;
	bool no_pdcm = l->perf_capabilities && !c->pmu.pdcm;
	uint64_t np_bits = 0;
	uint32_t max_basic, max_ext;
	struct pmu_info decoded;
	struct vcpu *v;
	struct vm vm;
	uint64_t val;

	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	if (l->perf_capabilities && !vcpu_get_msr(v, l->perf_capabilities, &val))
		before = (int64_t)val;
	if (no_pdcm) {
		/*
		 * vmx_pmu_caps_test.c perf_capabilities_unsupported: with PDCM clear the host reads 0,
		 * may write 0, and every single-bit value fails (x86.c kvm_{get,set}_msr_common:
		 * KVM_MSR_RET_UNSUPPORTED without PDCM; only the host's read / write of 0 pass).
		 */
		if (!vcpu_get_msr(v, l->perf_capabilities, &val))
			np_read = (int64_t)val;
		np_zero = vcpu_set_msr(v, l->perf_capabilities, 0);
		for (int i = 0; i < 64; i++)
			if (!vcpu_set_msr(v, l->perf_capabilities, 1ULL << i)) {
				np_bits |= 1ULL << i;
				vcpu_set_msr(v, l->perf_capabilities, 0);
			}
	}
	batch_begin(v);
	for (size_t i = 0; i < NLEAVES; i++)
		leaves[i] = batch_add(v, OP_CPUID, guest_leaves[i], 0, 0, 0, 0);
	if (l->perf_capabilities)
		caps_rd = g_rdmsr(v, l->perf_capabilities);
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	if (l->perf_capabilities && before >= 0) {
		/* Toggle FW_WRITES: a different value, host-initiated, once the vCPU has run. */
		set_errno = vcpu_set_msr(v, l->perf_capabilities, (uint64_t)before ^ PERF_CAP_FW_WRITES);
		if (!vcpu_get_msr(v, l->perf_capabilities, &val))
			after = (int64_t)val;
	}
	l->decode(&gv, &decoded);
	max_basic = (uint32_t)leaves[leaf_index(0)]->out[0];
	max_ext = (uint32_t)leaves[leaf_index(0x80000000)]->out[0];

	json_obj_begin(c->obs, "cpuid");
	json_leaf(c->obs, "0xa", leaves[leaf_index(0xa)], max_basic >= 0xa);
	json_leaf(c->obs, "0x1", leaves[leaf_index(1)], true);
	json_leaf(c->obs, "0x80000001", leaves[leaf_index(0x80000001)], max_ext >= 0x80000001);
	json_leaf(c->obs, "0x80000022", leaves[leaf_index(0x80000022)], max_ext >= 0x80000022);
	json_obj_end(c->obs);
	json_pmu_info(c->obs, "decoded", &decoded, caps_rd && caps_rd->vector < 0 ? (int64_t)caps_rd->out[0] : -1);
	json_obj_begin(c->obs, "perf_capabilities");
	if (caps_rd)
		json_access(c->obs, "guest_rdmsr", "rdmsr", l->perf_capabilities, "IA32_PERF_CAPABILITIES",
			    caps_rd, false, 0);
	else
		json_null(c->obs, "guest_rdmsr");
	json_opt_i64(c->obs, "host_before_run", before);
	json_opt_i64(c->obs, "host_set_after_run_errno", set_errno);
	json_opt_i64(c->obs, "host_after_run", after);
	if (no_pdcm) {
		json_obj_begin(c->obs, "without_pdcm");
		json_opt_i64(c->obs, "host_read", np_read);
		json_opt_i64(c->obs, "host_set_zero_errno", np_zero);
		json_u64(c->obs, "host_set_bits_accepted", np_bits);
		json_obj_end(c->obs);
	} else {
		json_null(c->obs, "without_pdcm");
	}
	json_obj_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

struct guard_plan {
	const char *name;
	bool write;
	uint32_t msr;
	uint64_t value;
	struct guest_cmd *cmd;
};

enum probe_status probe_guards(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	struct guard_plan g[24];
	enum probe_status ret = PROBE_OK;
	struct vcpu *v;
	struct vm vm;
	int n = 0;

	/* AnyThread: pmu->eventsel_rsvd and fixed_ctr_ctrl_rsvd keep it reserved (v6 22/44). */
	g[n++] = (struct guard_plan){ "anythread_evtsel", true, pmu_sel_msr(l, 0),
				      pmu_selector(pmu_event(l, "instructions"), EVTSEL_ANY), NULL };
	if (l->fixed_ctrl)
		g[n++] = (struct guard_plan){ "anythread_fixed_ctrl", true, l->fixed_ctrl,
					      FIXED_CTRL_OS | FIXED_CTRL_ANY, NULL };
	/* vmx_pmu_caps_test.c: a guest write of PERF_CAPABILITIES always #GPs, even of its value. */
	if (l->perf_capabilities)
		g[n++] = (struct guard_plan){ "perf_capabilities_write", true, l->perf_capabilities,
					      c->perf_caps >= 0 ? (uint64_t)c->perf_caps : 0, NULL };
	for (size_t i = 0; i < l->nguards && n < 24; i++)
		g[n++] = (struct guard_plan){ l->guards[i].name, l->guards[i].write, l->guards[i].msr,
					      l->guards[i].value, NULL };
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	batch_begin(v);
	for (int i = 0; i < n; i++) {
		g[i].cmd = g[i].write ? g_wrmsr(v, g[i].msr, g[i].value) : g_rdmsr(v, g[i].msr);
		if (g[i].write)
			g_wrmsr(v, g[i].msr, 0);        /* undo, should the write have been taken */
	}
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	json_arr_begin(c->obs, "accesses");
	for (int i = 0; i < n; i++) {
		json_obj_begin(c->obs, NULL);
		json_str(c->obs, "case", g[i].name);
		json_str(c->obs, "op", g[i].write ? "wrmsr" : "rdmsr");
		json_u64(c->obs, "target", g[i].msr);
		json_str(c->obs, "name", g[i].name);
		if (g[i].write)
			json_u64(c->obs, "written", g[i].value);
		else
			json_null(c->obs, "written");
		json_opt_i64(c->obs, "vector", g[i].cmd->vector);
		if (!g[i].write && g[i].cmd->vector < 0)
			json_u64(c->obs, "value", g[i].cmd->out[0]);
		else
			json_null(c->obs, "value");
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}
