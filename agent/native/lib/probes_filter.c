// SPDX-License-Identifier: GPL-2.0
/* KVM_SET_PMU_EVENT_FILTER probes: what the guest counts under each filter shape, a filter
 * change while the guest's selector stays programmed, and the ioctl's input validation. */
#include <errno.h>
#include <linux/kvm.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "probes.h"

/* Masked events arrived in Linux 6.3; the build host's headers may predate them. */
#ifndef KVM_PMU_EVENT_FLAG_MASKED_EVENTS
#define KVM_PMU_EVENT_FLAG_MASKED_EVENTS (1U << 0)
#endif
#define MASKED_ENTRY(sel, mask, match, exclude)						\
	(((uint64_t)(sel) & 0xffULL) | (((uint64_t)(sel) & 0xf00ULL) << 24) |		\
	 (((uint64_t)(mask) & 0xffULL) << 56) | (((uint64_t)(match) & 0xffULL) << 8) |	\
	 ((uint64_t)!!(exclude) << 55))
#define FILTER_MAX_EVENTS 300   /* KVM_PMU_EVENT_FILTER_MAX_EVENTS */

static const struct vm_opts default_opts = { .irqchip = true };

struct filter {
	bool set;
	uint32_t action, flags, fixed_bitmap, nevents;
	uint64_t events[8];
};

/* KVM_SET_PMU_EVENT_FILTER: 0 or errno.  nevents may exceed the array (too_many_events case). */
int set_filter(struct vm *vm, uint32_t action, uint32_t flags, uint32_t fixed_bitmap,
	       const uint64_t *events, uint32_t nevents)
{
	struct kvm_pmu_event_filter *f;
	int ret = 0;

	f = calloc(1, sizeof(*f) + (size_t)nevents * sizeof(f->events[0]));
	if (!f)
		return ENOMEM;
	f->action = action;
	f->flags = flags;
	f->fixed_counter_bitmap = fixed_bitmap;
	f->nevents = nevents;
	if (events)
		memcpy(f->events, events, (size_t)nevents * sizeof(f->events[0]));
	if (ioctl(vm->fd, KVM_SET_PMU_EVENT_FILTER, f) < 0)
		ret = errno;
	free(f);
	return ret;
}


/* The filter each case sets; the same shapes as agent/drivers/model.py. */
static int build_case(struct probe_ctx *c, const char *name, struct filter *f)
{
	const struct pmu_layout *l = c->l;
	const struct pmu_event *insn = pmu_event(l, "instructions"), *br = pmu_event(l, "branches");
	const struct pmu_event *cyc = pmu_event(l, "cycles"), *miss = pmu_event(l, "branch_misses");

	memset(f, 0, sizeof(*f));
	f->set = true;
	if (!strcmp(name, "none")) {
		f->set = false;
	} else if (!strcmp(name, "allow_member") || !strcmp(name, "deny_member")) {
		f->action = name[0] == 'a' ? KVM_PMU_EVENT_ALLOW : KVM_PMU_EVENT_DENY;
		f->events[f->nevents++] = pmu_filter_key(insn);
		f->events[f->nevents++] = pmu_filter_key(br);
	} else if (!strcmp(name, "allow_nonmember") || !strcmp(name, "deny_nonmember")) {
		f->action = name[0] == 'a' ? KVM_PMU_EVENT_ALLOW : KVM_PMU_EVENT_DENY;
		f->events[f->nevents++] = pmu_filter_key(cyc);
		f->events[f->nevents++] = pmu_filter_key(miss);
	} else if (!strcmp(name, "masked_include")) {
		/* Exactly our event/umask pairs. */
		f->action = KVM_PMU_EVENT_ALLOW;
		f->flags = KVM_PMU_EVENT_FLAG_MASKED_EVENTS;
		f->events[f->nevents++] = MASKED_ENTRY(insn->select, 0xff, insn->umask, 0);
		f->events[f->nevents++] = MASKED_ENTRY(br->select, 0xff, br->umask, 0);
	} else if (!strcmp(name, "masked_exclude")) {
		/* Any umask of our events, then exclude exactly ours: nothing of ours remains. */
		f->action = KVM_PMU_EVENT_ALLOW;
		f->flags = KVM_PMU_EVENT_FLAG_MASKED_EVENTS;
		f->events[f->nevents++] = MASKED_ENTRY(insn->select, 0, 0, 0);
		f->events[f->nevents++] = MASKED_ENTRY(br->select, 0, 0, 0);
		f->events[f->nevents++] = MASKED_ENTRY(insn->select, 0xff, insn->umask, 1);
		f->events[f->nevents++] = MASKED_ENTRY(br->select, 0xff, br->umask, 1);
	} else if (!strcmp(name, "fixed_allow") || !strcmp(name, "fixed_deny")) {
		f->action = !strcmp(name, "fixed_allow") ? KVM_PMU_EVENT_ALLOW : KVM_PMU_EVENT_DENY;
		f->fixed_bitmap = 0x1;
	} else if (!strcmp(name, "deny_high_select")) {
		/*
		 * 0x1C2: event select bits 35:32 = 1, low byte 0xC2.  Denying it must leave 0xC2
		 * (branches) counting: the filter compares all 12 select bits
		 * (pmu_event_filter_test.c test_amd_deny_list).
		 */
		f->action = KVM_PMU_EVENT_DENY;
		f->events[f->nevents++] = (br->select & 0xffULL) | (0x1ULL << 32) | ((uint64_t)br->umask << 8);
	} else if (!strcmp(name, "fixed_priority")) {
		/* events[] denies FC0's event; the (empty) bitmap decides for the fixed counter. */
		f->action = KVM_PMU_EVENT_DENY;
		f->events[f->nevents++] = pmu_filter_key(insn);
	} else {
		return -1;
	}
	return 0;
}

static void json_filter(struct json *j, const struct filter *f)
{
	if (!f->set) {
		json_null(j, "filter");
		return;
	}
	json_obj_begin(j, "filter");
	json_str(j, "action", f->action == KVM_PMU_EVENT_ALLOW ? "allow" : "deny");
	json_u64(j, "flags", f->flags);
	json_arr_begin(j, "events");
	for (uint32_t i = 0; i < f->nevents; i++)
		json_u64(j, NULL, f->events[i]);
	json_arr_end(j);
	json_u64(j, "fixed_counter_bitmap", f->fixed_bitmap);
	json_obj_end(j);
}

static void json_count(struct json *j, const char *key, const struct guest_cmd *cmd)
{
	if (cmd && cmd->vector < 0)
		json_u64(j, key, cmd->out[0]);
	else
		json_null(j, key);
}

enum probe_status probe_event_filter(struct probe_ctx *c)
{
	const char *name = arg_str(c, "case");
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	bool fc0 = l->fixed_base && (c->pmu.fixed_mask & 1);
	struct guest_cmd *insn = NULL, *br = NULL, *fix = NULL;
	int64_t kvm_exits = -1;
	enum probe_status ret = probe_need_counters(c, 2);
	struct run_stats st = { 0 };
	struct filter f;
	struct vcpu *v;
	struct vm vm;
	int set_errno = 0;

	if (ret != PROBE_OK)
		return ret;
	if (build_case(c, name, &f))
		return probe_fail(c, "probe event_filter: unknown case '%s'", name);
	if (!strncmp(name, "fixed_", 6) && !fc0)
		return probe_unsupported(c, "case %s needs fixed counter 0; the %s guest PMU has none",
					 name, l->vendor);
	if (!strcmp(name, "deny_high_select") && l->fixed_base)
		return probe_unsupported(c, "case %s is AMD's (event select bits 35:32); Intel has none",
					 name);
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	if (f.set)
		set_errno = set_filter(&vm, f.action, f.flags, f.fixed_bitmap, f.events, f.nevents);

	batch_begin(v);
	g_pmu_quiesce(c, v);
	g_wrmsr(v, pmu_sel_msr(l, 0), pmu_selector(pmu_event(l, "instructions"), EVTSEL_EN));
	g_wrmsr(v, pmu_sel_msr(l, 1), pmu_selector(pmu_event(l, "branches"), EVTSEL_EN));
	if (fc0)
		g_wrmsr(v, l->fixed_ctrl, FIXED_CTRL_OS | FIXED_CTRL_USR);
	if (run_measured(c, v, 0x3 | (fc0 ? 1ULL << 32 : 0), n, LOOP_EXIT_EACH, &st, &kvm_exits) == 0) {
		insn = g_rdmsr(v, pmu_ctr_msr(l, 0));
		br = g_rdmsr(v, pmu_ctr_msr(l, 1));
		if (fc0)
			fix = g_rdmsr(v, l->fixed_base);
		g_pmu_quiesce(c, v);
		if (batch_run(v, NULL))
			insn = br = fix = NULL;
	}
	if (!insn)
		ret = probe_fail(c, "%s", vm.err);

	json_str(c->obs, "case", name);
	json_i64(c->obs, "set_errno", set_errno);
	json_filter(c->obs, &f);
	json_workload(c, "workload", LOOP_EXIT_EACH, n, st.ticks, kvm_exits);
	json_obj_begin(c->obs, "counts");
	json_count(c->obs, "instructions", insn);
	json_count(c->obs, "branches", br);
	json_count(c->obs, "fixed_instructions", fix);
	json_obj_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_filter_update(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	const struct pmu_event *br = pmu_event(l, "branches");
	uint64_t sel = pmu_selector(br, EVTSEL_EN), key = pmu_filter_key(br);
	struct guest_cmd *before, *sel_after, *denied, *allowed;
	struct guest_cmd kept[3];   /* the next batch_begin() reuses the command slots */
	enum probe_status ret = probe_need_counters(c, 1);
	int deny_errno, allow_errno;
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	/* Phase 1: no filter; the selector is written once and never again by the guest. */
	batch_begin(v);
	g_pmu_quiesce(c, v);
	g_wrmsr(v, pmu_sel_msr(l, 0), sel);
	g_measure(c, v, 0x1, n, true);
	before = g_rdmsr(v, pmu_ctr_msr(l, 0));
	if (batch_run(v, NULL))
		goto fail;
	kept[0] = *before;
	before = &kept[0];

	/* Phase 2: the host denies the event between two guest runs. */
	deny_errno = set_filter(&vm, KVM_PMU_EVENT_DENY, 0, 0, &key, 1);
	batch_begin(v);
	g_wrmsr(v, pmu_ctr_msr(l, 0), 0);
	sel_after = g_rdmsr(v, pmu_sel_msr(l, 0));
	g_measure(c, v, 0x1, n, true);
	denied = g_rdmsr(v, pmu_ctr_msr(l, 0));
	if (batch_run(v, NULL))
		goto fail;
	kept[1] = *sel_after;
	kept[2] = *denied;
	sel_after = &kept[1];
	denied = &kept[2];

	/* Phase 3: an empty deny list allows everything again. */
	allow_errno = set_filter(&vm, KVM_PMU_EVENT_DENY, 0, 0, NULL, 0);
	batch_begin(v);
	g_wrmsr(v, pmu_ctr_msr(l, 0), 0);
	g_measure(c, v, 0x1, n, true);
	allowed = g_rdmsr(v, pmu_ctr_msr(l, 0));
	g_pmu_quiesce(c, v);
	if (batch_run(v, NULL))
		goto fail;

	json_u64(c->obs, "selector_written", sel);
	json_count(c->obs, "selector_read_after_deny", sel_after);
	json_count(c->obs, "count_before_deny", before);
	json_count(c->obs, "count_after_deny", denied);
	json_count(c->obs, "count_after_allow", allowed);
	json_i64(c->obs, "deny_errno", deny_errno);
	json_i64(c->obs, "allow_errno", allow_errno);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return PROBE_OK;
fail:
	ret = probe_fail(c, "%s", vm.err);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

enum probe_status probe_filter_invalid(struct probe_ctx *c)
{
	const struct pmu_event *insn = pmu_event(c->l, "instructions");
	uint64_t key = pmu_filter_key(insn);
	/* A masked entry with a bit set in the unused range 36:54. */
	uint64_t bad_masked = MASKED_ENTRY(insn->select, 0xff, insn->umask, 0) | (1ULL << 40);
	/* Accepted: junk outside select+umask with flags 0, a masked entry at every field's maximum. */
	uint64_t junk = ~0ULL, masked_max = MASKED_ENTRY(0xff, 0xff, 0xff, 1);
	struct vm_opts o = probe_opts(c);
	struct vm vm;
	int e[7];

	if (vm_create(&vm, &o)) {
		enum probe_status ret = probe_fail(c, "%s", vm.err);

		vm_destroy(&vm);
		return ret;
	}
	e[0] = set_filter(&vm, 2, 0, 0, &key, 1);                          /* neither allow nor deny */
	e[1] = set_filter(&vm, KVM_PMU_EVENT_ALLOW, 1U << 1, 0, &key, 1);  /* undefined flag */
	e[2] = set_filter(&vm, KVM_PMU_EVENT_ALLOW, 0, 0, NULL, FILTER_MAX_EVENTS + 1);
	e[3] = set_filter(&vm, KVM_PMU_EVENT_ALLOW, KVM_PMU_EVENT_FLAG_MASKED_EVENTS, 0, &bad_masked, 1);
	e[4] = set_filter(&vm, KVM_PMU_EVENT_ALLOW, 0, 0, &junk, 1);
	e[5] = set_filter(&vm, KVM_PMU_EVENT_ALLOW, KVM_PMU_EVENT_FLAG_MASKED_EVENTS, 0, &masked_max, 1);
	/* ~GENMASK(nr_fixed, 0): counters that do not exist (test_filter_ioctl). */
	e[6] = set_filter(&vm, KVM_PMU_EVENT_ALLOW, 0, ~0U << (c->pmu.fixed + 1), &key, 1);
	vm_destroy(&vm);

	json_arr_begin(c->obs, "cases");
	{
		static const char *const names[] = { "bad_action", "bad_flags", "too_many_events",
						     "masked_bad_entry", "junk_bits_unmasked", "masked_valid",
						     "fixed_bitmap_nonexistent" };

		for (int i = 0; i < 7; i++) {
			json_obj_begin(c->obs, NULL);
			json_str(c->obs, "case", names[i]);
			json_i64(c->obs, "errno", e[i]);
			json_obj_end(c->obs);
		}
	}
	json_arr_end(c->obs);
	return PROBE_OK;
}

/* Counts of GP counters 0..nsel-1 programmed with sels[] over the loop (GLOBAL_CTRL window). */
static int count_sels(struct probe_ctx *c, struct vcpu *v, const uint64_t *sels, int nsel, uint64_t n,
		      struct reading *out)
{
	const struct pmu_layout *l = c->l;
	struct guest_cmd *rd[8];
	int e;

	batch_begin(v);
	g_pmu_quiesce(c, v);
	for (int i = 0; i < nsel; i++)
		g_wrmsr(v, pmu_sel_msr(l, i), sels[i]);
	g_measure(c, v, width_mask(nsel), n, false);
	for (int i = 0; i < nsel; i++)
		rd[i] = g_rdmsr(v, pmu_ctr_msr(l, i));
	g_pmu_quiesce(c, v);
	e = batch_run(v, NULL);
	for (int i = 0; i < nsel; i++)
		out[i] = reading_of(rd[i]);
	return e;
}

enum probe_status probe_umask_pair(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	struct { const struct pmu_event *a, *b; struct reading plain[2], denied[2]; int set_errno; } pr[4];
	enum probe_status ret = probe_need_counters(c, 2);
	int np = 0;
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	memset(pr, 0, sizeof(pr));
	/* Pairs straight from the vendor's table: same event select, different unit mask. */
	for (size_t i = 0; i < l->nevents && np < 4; i++)
		for (size_t k = i + 1; k < l->nevents && np < 4; k++)
			if (l->events[i].select == l->events[k].select && l->events[i].umask != l->events[k].umask) {
				pr[np].a = &l->events[i];
				pr[np++].b = &l->events[k];
			}
	if (!np)
		return probe_unsupported(c, "the %s event table has no two events sharing an event select",
					 l->vendor);
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	for (int i = 0; i < np && ret == PROBE_OK; i++) {
		uint64_t sels[2] = { pmu_selector(pr[i].a, EVTSEL_EN), pmu_selector(pr[i].b, EVTSEL_EN) };
		uint64_t key = pmu_filter_key(pr[i].b);

		if (count_sels(c, v, sels, 2, n, pr[i].plain))
			ret = probe_fail(c, "%s", vm.err);
		/* The filter key carries the umask: denying the second must not touch the first. */
		pr[i].set_errno = set_filter(&vm, KVM_PMU_EVENT_DENY, 0, 0, &key, 1);
		if (ret == PROBE_OK && count_sels(c, v, sels, 2, n, pr[i].denied))
			ret = probe_fail(c, "%s", vm.err);
		set_filter(&vm, KVM_PMU_EVENT_DENY, 0, 0, NULL, 0);
	}
	json_workload(c, "workload", LOOP_PLAIN, n, 0, -1);
	json_arr_begin(c->obs, "pairs");
	for (int i = 0; i < np; i++) {
		json_obj_begin(c->obs, NULL);
		json_u64(c->obs, "select", pr[i].a->select);
		for (int k = 0; k < 2; k++) {
			const struct pmu_event *e = k ? pr[i].b : pr[i].a;

			json_obj_begin(c->obs, k ? "second" : "first");
			json_str(c->obs, "event", e->name);
			json_u64(c->obs, "umask", e->umask);
			json_reading(c->obs, "count", pr[i].plain[k]);
			json_reading(c->obs, "count_second_denied", pr[i].denied[k]);
			json_obj_end(c->obs);
		}
		json_i64(c->obs, "set_errno", pr[i].set_errno);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

#define MAX_TEST_EVENTS 10      /* pmu_event_filter_test.c: room kept for a case's entries */

enum probe_status probe_masked_events(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	bool dense = !strcmp(arg_str(c, "density"), "dense");
	const struct pmu_layout *l = c->l;
	const struct pmu_event *mem = l->mem_events;
	struct { struct reading cnt[3]; int set_errno; uint64_t ev[2]; } r[MASKED_CASES];
	enum probe_status ret = probe_need_counters(c, 3);
	int ndummy = dense ? FILTER_MAX_EVENTS - MAX_TEST_EVENTS : 0, done = 0;
	uint64_t *ev;
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	ev = calloc(FILTER_MAX_EVENTS, sizeof(*ev));
	if (!ev)
		return probe_fail(c, "out of memory");
	memset(r, 0, sizeof(r));
	/* add_dummy_events(): every select but the tested one, every 4th an exclude entry. */
	for (int i = 0; i < ndummy; i++) {
		int sel = i % 0xff;

		if (sel == (mem[0].select & 0xff))
			sel++;
		ev[i] = MASKED_ENTRY(sel, 0, 0, i % 4 == 0);
	}
	if (probe_vm(c, &vm, &v, &default_opts)) {
		free(ev);
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	for (int k = 0; k < MASKED_CASES && ret == PROBE_OK; k++, done++) {
		const struct masked_case *mc = &l->masked_cases[k];
		struct guest_cmd *cnt[3];

		for (int e = 0; e < mc->n; e++) {
			r[k].ev[e] = MASKED_ENTRY(mem[0].select, mc->e[e].mask, mc->e[e].match, mc->e[e].exclude);
			ev[ndummy + e] = r[k].ev[e];
		}
		r[k].set_errno = set_filter(&vm, KVM_PMU_EVENT_ALLOW, KVM_PMU_EVENT_FLAG_MASKED_EVENTS, 0, ev,
					    (uint32_t)(ndummy + mc->n));
		/* Loads, stores and loads+stores on GP 0-2 over the memory loop. */
		batch_begin(v);
		g_pmu_quiesce(c, v);
		for (int i = 0; i < 3; i++)
			g_wrmsr(v, pmu_sel_msr(l, i), pmu_selector(&mem[i], EVTSEL_EN));
		g_wrmsr(v, l->global_ctrl, 0x7);
		batch_add(v, OP_MEMLOOP, n, 0, 0, 0, 0);
		g_wrmsr(v, l->global_ctrl, 0);
		for (int i = 0; i < 3; i++)
			cnt[i] = g_rdmsr(v, pmu_ctr_msr(l, i));
		g_pmu_quiesce(c, v);
		if (batch_run(v, NULL))
			ret = probe_fail(c, "case %d: %s", k, vm.err);
		for (int i = 0; i < 3; i++)
			r[k].cnt[i] = reading_of(cnt[i]);
	}
	json_str(c->obs, "density", dense ? "dense" : "sparse");
	json_i64(c->obs, "nevents_dummy", ndummy);
	json_arr_begin(c->obs, "cases");
	for (int k = 0; k < done; k++) {
		static const char *const names[3] = { "loads", "stores", "loads_stores" };

		json_obj_begin(c->obs, NULL);
		json_i64(c->obs, "case", k);
		json_i64(c->obs, "set_errno", r[k].set_errno);
		json_arr_begin(c->obs, "events");
		for (int e = 0; e < l->masked_cases[k].n; e++)
			json_u64(c->obs, NULL, r[k].ev[e]);
		json_arr_end(c->obs);
		json_obj_begin(c->obs, "counts");
		for (int i = 0; i < 3; i++)
			json_reading(c->obs, names[i], r[k].cnt[i]);
		json_obj_end(c->obs);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	free(ev);
	vm_destroy(&vm);
	return ret;
}

/* FC idx counts its event over the loop: the upstream guest's only job (intel_run_fixed_counter_guest_code). */
static int count_fixed(struct probe_ctx *c, struct vcpu *v, int idx, uint64_t n, struct reading *out)
{
	const struct pmu_layout *l = c->l;
	struct guest_cmd *rd;
	int e;

	batch_begin(v);
	g_pmu_quiesce(c, v);
	g_wrmsr(v, l->fixed_ctrl, (FIXED_CTRL_OS | FIXED_CTRL_USR) << (4 * idx));
	g_measure(c, v, 1ULL << (32 + idx), n, false);
	rd = g_rdmsr(v, l->fixed_base + (uint32_t)idx);
	g_pmu_quiesce(c, v);
	e = batch_run(v, NULL);
	*out = reading_of(rd);
	return e;
}

enum probe_status probe_filter_fixed_bitmap(struct probe_ctx *c)
{
	uint64_t n = (uint64_t)arg_int(c, "iterations");
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	const uint64_t events[2] = { pmu_filter_key(pmu_event(l, "instructions")),
				     pmu_filter_key(pmu_event(l, "branches")) };
	int m = p->fixed > 4 ? 4 : p->fixed;
	struct reading none[4];
	enum probe_status ret = probe_need_counters(c, 1);
	struct vcpu *v;
	struct vm vm;

	if (ret != PROBE_OK)
		return ret;
	if (!l->fixed_base || !m)
		return probe_unsupported(c, "the %s guest PMU has no fixed counters", l->vendor);
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	json_i64(c->obs, "fixed_counters", m);
	for (int i = 0; i < m && ret == PROBE_OK; i++)
		if (count_fixed(c, v, i, n, &none[i]))
			ret = probe_fail(c, "%s", vm.err);
	json_arr_begin(c->obs, "no_filter");
	for (int i = 0; i < m; i++)
		json_reading(c->obs, NULL, ret == PROBE_OK && (p->fixed_mask >> i & 1) ? none[i] :
			     (struct reading){ false, 0 });
	json_arr_end(c->obs);
	json_arr_begin(c->obs, "results");
	/* Every supported counter x every bitmap x allow/deny x with and without events[]. */
	for (int i = 0; i < m && ret == PROBE_OK; i++) {
		if (!(p->fixed_mask >> i & 1))
			continue;
		for (uint32_t b = 0; b < (1u << m) && ret == PROBE_OK; b++) {
			for (int act = 0; act < 2 && ret == PROBE_OK; act++) {
				for (int with = 0; with < 2 && ret == PROBE_OK; with++) {
					uint32_t action = act ? KVM_PMU_EVENT_DENY : KVM_PMU_EVENT_ALLOW;
					int e = set_filter(&vm, action, 0, b, with ? events : NULL, with ? 2 : 0);
					struct reading r;

					if (count_fixed(c, v, i, n, &r))
						ret = probe_fail(c, "%s", vm.err);
					json_obj_begin(c->obs, NULL);
					json_i64(c->obs, "counter", i);
					json_u64(c->obs, "bitmap", b);
					json_str(c->obs, "action", act ? "deny" : "allow");
					json_bool(c->obs, "with_events", with);
					json_i64(c->obs, "set_errno", e);
					json_reading(c->obs, "count", r);
					json_obj_end(c->obs);
				}
			}
		}
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}
