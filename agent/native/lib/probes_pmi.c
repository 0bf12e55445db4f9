// SPDX-License-Identifier: GPL-2.0
/*
 * PMI delivery: a counter preset near overflow with the INT bit; the guest's x2APIC LVTPC routes
 * it to PMI_VECTOR, unmasked or masked.  On the host, mediated PMIs arrive on their own vector and
 * are counted on the /proc/interrupts "VPMI" row; a host NMI would mean the guest LVTPC was not
 * loaded.
 */
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "perf.h"
#include "probes.h"

#define PMI_VECTOR    0x20
#define X2APIC_LVTPC  0x834
#define LVT_MASKED    (1ULL << 16)

static const struct vm_opts default_opts = { .irqchip = true };

/*
 * One /proc/interrupts row on one CPU (the header names the online CPUs' columns), -1 unknown.
 * The sum over all CPUs counts NMIs of exclude_guest sampling elsewhere, which the mediated
 * PMU allows (finding 15); the vCPU's own CPU is what a host-NMI-for-a-guest-PMI would hit.
 */
static int64_t irq_on_cpu(const char *label, int cpu)
{
	FILE *f = fopen("/proc/interrupts", "re");
	char *line = NULL, *p, *end;
	size_t cap = 0, n = strlen(label);
	int col = -1, k = 0;
	int64_t ret = -1;

	if (!f)
		return -1;
	if (getline(&line, &cap, f) > 0)
		for (p = line; (p = strstr(p, "CPU")); p += 3, k++)
			if (strtol(p + 3, &end, 10) == cpu && end != p + 3)
				col = k;
	while (col >= 0 && getline(&line, &cap, f) > 0) {
		for (p = line; *p == ' '; p++)
			;
		if (strncmp(p, label, n) || p[n] != ':')
			continue;
		p += n + 1;
		for (k = 0;; k++, p = end) {
			unsigned long long v = strtoull(p, &end, 10);

			if (end == p)
				break;
			if (k == col) {
				ret = (int64_t)v;
				break;
			}
		}
		break;
	}
	free(line);
	fclose(f);
	return ret;
}

enum probe_status probe_pmi(struct probe_ctx *c)
{
	bool masked = !strcmp(arg_str(c, "lvtpc"), "masked");
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	struct guest_cmd *apic, *lvt, *status;
	enum probe_status ret = PROBE_OK;
	int64_t vpmi_before, vpmi_after, nmi_before, nmi_after, cpu_nmi_before, cpu_nmi_after;
	int cpu = c->cpu;
	struct vcpu *v;
	struct vm vm;

	if (!p->has_global || p->gp < 1)
		return probe_unsupported(c, "the guest PMU (version %d, %d GP counters) has no global "
					 "control register", p->version, p->gp);
	/* Pinned, so that the vCPU's own CPU's NMI row means something. */
	if (cpu < 0) {
		int e;

		cpu = sched_getcpu();
		e = cpu < 0 ? errno : pin_to_cpu(cpu);
		if (e)
			return probe_fail(c, "cannot pin to a CPU: %s", strerror(e));
	}
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	vpmi_before = proc_interrupts("VPMI");
	nmi_before = proc_interrupts("NMI");
	cpu_nmi_before = irq_on_cpu("NMI", cpu);
	batch_begin(v);
	apic = batch_add(v, OP_X2APIC_ENABLE, 0, 0, 0, 0, 0);
	lvt = g_wrmsr(v, X2APIC_LVTPC, PMI_VECTOR | (masked ? LVT_MASKED : 0));
	g_pmu_quiesce(c, v);
	/*
	 * Branches, not instructions: KVM bumps a mediated counter in software for the OUT it
	 * emulates (kvm_pmu_incr_counter via kvm_skip_emulated_instruction -> instruction_retired)
	 * and raises KVM_REQ_PMI itself, with no hardware PMI and no host VPMI.  The loop's JNZ is
	 * never emulated, so the 64th branch overflows in hardware (finding 7).
	 */
	g_wrmsr(v, pmu_ctr_msr(l, 0), width_mask(p->gp_width) - 63);
	g_wrmsr(v, pmu_sel_msr(l, 0),
		pmu_selector(pmu_event(l, "branches"), EVTSEL_EN | EVTSEL_INT));
	batch_add(v, OP_STI, 0, 0, 0, 0, 0);
	/* Exits inside the loop give KVM entries at which to inject the PMI. */
	g_measure(c, v, 0x1, 1000, true);
	batch_add(v, OP_SPIN, 100000, 0, 0, 0, 0);
	batch_add(v, OP_CLI, 0, 0, 0, 0, 0);
	g_wrmsr(v, pmu_sel_msr(l, 0), 0);
	status = g_rdmsr(v, l->global_status);
	g_wrmsr(v, l->global_status_clr, pmu_global_mask(p, true));
	if (batch_run(v, NULL))
		ret = probe_fail(c, "%s", vm.err);
	vpmi_after = proc_interrupts("VPMI");
	nmi_after = proc_interrupts("NMI");
	cpu_nmi_after = irq_on_cpu("NMI", cpu);

	json_str(c->obs, "lvtpc", masked ? "masked" : "unmasked");
	json_str(c->obs, "event", "branches");
	json_i64(c->obs, "vector", PMI_VECTOR);
	json_u64(c->obs, "interrupts", v->area->irq_count);
	if (status->vector < 0)
		json_u64(c->obs, "global_status", status->out[0]);
	else
		json_null(c->obs, "global_status");
	json_opt_i64(c->obs, "host_vpmi_before", vpmi_before);
	json_opt_i64(c->obs, "host_vpmi_after", vpmi_after);
	json_opt_i64(c->obs, "host_nmi_delta",
		     nmi_before >= 0 && nmi_after >= 0 ? nmi_after - nmi_before : -1);
	json_i64(c->obs, "cpu", cpu);
	json_opt_i64(c->obs, "host_nmi_delta_cpu",
		     cpu_nmi_before >= 0 && cpu_nmi_after >= 0 ? cpu_nmi_after - cpu_nmi_before : -1);
	json_opt_i64(c->obs, "last_vector", v->area->irq_count ? (int64_t)v->area->last_irq_vector : -1);
	json_opt_i64(c->obs, "x2apic_vector", apic->vector);
	json_opt_i64(c->obs, "lvtpc_vector", lvt->vector);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}

/*
 * kvm-unit-tests x86/pmu.c check_counter_overflow, every counter in turn: preset 64 events from
 * overflow, count over the exit-free loop (so the wrap is a hardware one), with and without the
 * PMI bit.  Intel sets LVTPC.mask when it delivers a PMI (SDM "Handling PMI"), so after each
 * batch the guest reads LVTPC and unmasks it again before the next counter.
 */
enum probe_status probe_overflow_all(struct probe_ctx *c)
{
	const struct pmu_layout *l = c->l;
	const struct pmu_info *p = &c->pmu;
	bool fw = probe_full_width(c) || !l->legacy_ctr_base;
	struct { const char *kind, *event; int index; bool pmi; struct reading count, status, lvt;
		 uint64_t irqs; } r[32];
	enum probe_status ret = probe_need_counters(c, 1);
	struct guest_cmd *apic;
	struct vcpu *v;
	struct vm vm;
	int n = 0;

	if (ret != PROBE_OK)
		return ret;
	if (probe_vm(c, &vm, &v, &default_opts)) {
		vm_destroy(&vm);
		return PROBE_ERROR;
	}
	batch_begin(v);
	apic = batch_add(v, OP_X2APIC_ENABLE, 0, 0, 0, 0, 0);
	g_wrmsr(v, X2APIC_LVTPC, PMI_VECTOR);
	if (batch_run(v, NULL) || apic->vector >= 0) {
		ret = apic->vector >= 0 ? probe_fail(c, "x2APIC enable took vector %d", apic->vector) :
					  probe_fail(c, "%s", vm.err);
		vm_destroy(&vm);
		return ret;
	}
	for (int k = 0; k < p->gp + p->fixed && n < 32 && ret == PROBE_OK; k++) {
		bool gp = k < p->gp;
		int idx = gp ? k : k - p->gp;

		if (gp && idx >= (int)l->max_gp)
			continue;
		if (!gp && (!(p->fixed_mask >> idx & 1) || idx >= (int)l->nfixed_events))
			continue;
		for (int pmi = 1; pmi >= 0 && n < 32 && ret == PROBE_OK; pmi--, n++) {
			uint64_t before = v->area->irq_count;
			struct guest_cmd *cnt, *st, *lvt;
			uint32_t ctr;

			batch_begin(v);
			g_pmu_quiesce(c, v);
			if (gp) {
				/* -64 through the full-width alias, or 32 bits sign-extended via the legacy one. */
				ctr = fw ? pmu_ctr_msr(l, idx) : l->legacy_ctr_base + (uint32_t)idx;
				g_wrmsr(v, ctr, fw ? width_mask(p->gp_width) - 63 : 0xffffffc0ULL);
				g_wrmsr(v, pmu_sel_msr(l, idx), pmu_selector(pmu_event(l, "branches"),
									   EVTSEL_EN | (pmi ? EVTSEL_INT : 0)));
			} else {
				ctr = l->fixed_base + (uint32_t)idx;
				g_wrmsr(v, ctr, width_mask(p->fixed_width) - 63);
				g_wrmsr(v, l->fixed_ctrl, (FIXED_CTRL_OS | FIXED_CTRL_USR |
							   (pmi ? FIXED_CTRL_PMI : 0)) << (4 * idx));
			}
			batch_add(v, OP_STI, 0, 0, 0, 0, 0);
			g_measure(c, v, gp ? 1ULL << idx : 1ULL << (32 + idx), 1000, false);
			/* An interrupt window: the PMI exits the guest at once and is injected on re-entry. */
			batch_add(v, OP_SPIN, 20000, 0, 0, 0, 0);
			batch_add(v, OP_CLI, 0, 0, 0, 0, 0);
			cnt = g_rdmsr(v, gp ? pmu_ctr_msr(l, idx) : ctr);
			st = g_rdmsr(v, l->global_status);
			lvt = g_rdmsr(v, X2APIC_LVTPC);
			g_wrmsr(v, X2APIC_LVTPC, PMI_VECTOR);          /* re-unmask for the next counter */
			g_pmu_quiesce(c, v);
			if (batch_run(v, NULL))
				ret = probe_fail(c, "%s", vm.err);
			r[n].kind = gp ? "gp" : "fixed";
			r[n].event = gp ? "branches" : l->fixed_events[idx];
			r[n].index = idx;
			r[n].pmi = pmi;
			r[n].count = reading_of(cnt);
			r[n].status = reading_of(st);
			r[n].lvt = reading_of(lvt);
			r[n].irqs = v->area->irq_count - before;
		}
	}
	json_str(c->obs, "event", "branches");
	json_i64(c->obs, "vector", PMI_VECTOR);
	json_arr_begin(c->obs, "counters");
	for (int i = 0; i < n; i++) {
		json_obj_begin(c->obs, NULL);
		json_str(c->obs, "kind", r[i].kind);
		json_i64(c->obs, "index", r[i].index);
		json_str(c->obs, "event", r[i].event);
		json_bool(c->obs, "int", r[i].pmi);
		json_reading(c->obs, "count", r[i].count);
		json_reading(c->obs, "global_status", r[i].status);
		json_u64(c->obs, "interrupts", r[i].irqs);
		json_reading(c->obs, "lvtpc_after", r[i].lvt);
		json_obj_end(c->obs);
	}
	json_arr_end(c->obs);
	json_exceptions(c->obs, v);
	vm_destroy(&vm);
	return ret;
}
