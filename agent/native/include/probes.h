/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The probe catalogue (agent/protocol.py PROBES is the source of truth: same names, parameters,
 * defaults and observation keys) and the context every probe runs in.
 */
#ifndef PMUFARM_PROBES_H
#define PMUFARM_PROBES_H

#include <stdbool.h>
#include <stdint.h>

#include "caps.h"
#include "json.h"
#include "pmu.h"
#include "vm.h"

enum probe_status { PROBE_OK, PROBE_UNSUPPORTED, PROBE_ERROR };

#define PROBE_MAX_PARAMS 3
#define PROBE_STR_LEN    32

struct probe_param {
	const char *name;
	bool is_str;
	int64_t def_int, min_int, max_int;
	const char *def_str;
	const char *const *choices;     /* NULL-terminated, for string parameters */
};

struct probe_ctx;

struct probe {
	const char *name;
	bool needs_pmu;
	struct probe_param params[PROBE_MAX_PARAMS];
	enum probe_status (*run)(struct probe_ctx *c);    /* shapes the guest PMU, then body */
	enum probe_status (*body)(struct probe_ctx *c);
	int min_version;                                  /* default guest PMU version at least */
};

/* Guest-PMU shaping options every PMU probe takes (agent/protocol.py GUEST_PMU_PARAMS). */
enum { SHAPE_VERSION, SHAPE_GP, SHAPE_GP_WIDTH, SHAPE_FIXED, SHAPE_FIXED_BITMAP, SHAPE_PERF_CAPS,
       SHAPE_PDCM, PROBE_NSHAPE };

struct probe_ctx {
	const struct probe *probe;
	struct host_caps *caps;
	const struct pmu_layout *l;     /* the host vendor's table (NULL: unknown vendor) */
	struct pmu_info pmu;            /* the guest's PMU: as shaped into its CPUID, decoded */
	struct guest_pmu_cfg guest;     /* what every VM of the probe gets (lib/probe.c probe_shape) */
	int64_t perf_caps;              /* the guest's IA32_PERF_CAPABILITIES, -1 unknown / none */
	int64_t shape[PROBE_NSHAPE];    /* shaping options, -1 = default */
	struct json *obs;               /* the open "observations" object */
	char reason[1024];
	int64_t ival[PROBE_MAX_PARAMS];
	char sval[PROBE_MAX_PARAMS][PROBE_STR_LEN];
	int cpu;                        /* pinned CPU, -1 if not pinned */
};

extern const struct probe probe_table[];
extern const int probe_count;

const struct probe *probe_find(const char *name);
/* Parse k=v arguments into c (defaults first).  -1 with c->reason naming the argument. */
int probe_parse_args(struct probe_ctx *c, int argc, char **argv);
int64_t arg_int(const struct probe_ctx *c, const char *name);
const char *arg_str(const struct probe_ctx *c, const char *name);

__attribute__((format(printf, 2, 3)))
enum probe_status probe_fail(struct probe_ctx *c, const char *fmt, ...);
__attribute__((format(printf, 2, 3)))
enum probe_status probe_unsupported(struct probe_ctx *c, const char *fmt, ...);
/* Counting probes need global control (mediated implies it: Intel v4+, AMD PerfMonV2) and gp counters. */
enum probe_status probe_need_counters(struct probe_ctx *c, int gp);

/* Helpers shared by the probe files (lib/probe.c). */
int probe_vm(struct probe_ctx *c, struct vm *vm, struct vcpu **v, const struct vm_opts *o);
/* Default VM options with the probe's guest PMU (for probes that call vm_create themselves). */
struct vm_opts probe_opts(const struct probe_ctx *c);
/* A guest read copied out of the mailbox (the next batch reuses the command slots). */
struct reading {
	bool ok;            /* no exception */
	uint64_t value;
};
static inline struct reading reading_of(const struct guest_cmd *cmd)
{
	return (struct reading){ cmd && cmd->vector < 0, cmd ? cmd->out[0] : 0 };
}
void json_reading(struct json *j, const char *key, struct reading r);

/* The guest_pmu observation shape for any PMU view. */
void json_pmu_info(struct json *j, const char *key, const struct pmu_info *p, int64_t perf_caps);
/* CPUID.1:EDX[19] in the guest's CPUID (KVM's supported table). */
bool probe_guest_has_clflush(const struct probe_ctx *c);
/* Whether the guest's full-width counter alias (IA32_PMCx) is usable: FW_WRITES, or not Intel. */
bool probe_full_width(const struct probe_ctx *c);
void json_access(struct json *j, const char *key, const char *op, uint32_t target, const char *name,
		 const struct guest_cmd *cmd, bool has_written, uint64_t written);
void json_exceptions(struct json *j, const struct vcpu *v);
/* The measured loop's contract (include/guest_abi.h); exits = forced exits seen by the host. */
enum loop_kind { LOOP_PLAIN, LOOP_EXIT_EACH, LOOP_CLFLUSH };
void json_workload(struct probe_ctx *c, const char *key, enum loop_kind k, uint64_t n, uint64_t exits,
		   int64_t kvm_exits);
/*
 * KVM's own count of this vCPU's VM-exits (KVM_GET_STATS_FD, stat "exits"): in-kernel exits
 * (host interrupts, NMIs, intercepted MSRs) included, which userspace never sees.  -1 unknown.
 */
int64_t vcpu_kvm_exits(struct vcpu *v);
/*
 * Run the batch built so far (the setup), then a batch holding only the measured loop, with
 * KVM's exit count taken around it (*kvm_exits, -1 unknown).  The caller then begins a new batch
 * for the reads.  0, or -1 with the VM's error.
 */
int run_measured(struct probe_ctx *c, struct vcpu *v, uint64_t enable_mask, uint64_t n, enum loop_kind k,
		 struct run_stats *st, int64_t *kvm_exits);
/* Whether kvm_path.global_ctrl is "intercepted" (KVM's rule, derived). */
bool probe_global_ctrl_intercepted(const struct probe_ctx *c);
uint64_t now_ns(void);

/* KVM_SET_PMU_EVENT_FILTER: 0 or errno (lib/probes_filter.c). */
int set_filter(struct vm *vm, uint32_t action, uint32_t flags, uint32_t fixed_bitmap,
	       const uint64_t *events, uint32_t nevents);

/* Programming the guest PMU through batches. */
void g_pmu_quiesce(struct probe_ctx *c, struct vcpu *v);   /* global ctrl 0, selectors 0, counters 0 */
struct guest_cmd *g_measure(struct probe_ctx *c, struct vcpu *v, uint64_t enable_mask, uint64_t n,
			    bool exit_each);
struct guest_cmd *g_measure_loop(struct probe_ctx *c, struct vcpu *v, uint64_t enable_mask, uint64_t n,
				 enum loop_kind k);

/* Probes, by catalogue section. */
enum probe_status probe_selftest(struct probe_ctx *c);
enum probe_status probe_guest_count(struct probe_ctx *c);
enum probe_status probe_host_excludes_guest(struct probe_ctx *c);
enum probe_status probe_exclusivity(struct probe_ctx *c);
enum probe_status probe_fresh_state(struct probe_ctx *c);
enum probe_status probe_cross_context(struct probe_ctx *c);
enum probe_status probe_unexposed(struct probe_ctx *c);
enum probe_status probe_pmu_disabled(struct probe_ctx *c);
enum probe_status probe_arch_events(struct probe_ctx *c);
enum probe_status probe_disabled_counter(struct probe_ctx *c);
enum probe_status probe_counter_width(struct probe_ctx *c);
enum probe_status probe_global_ctrl(struct probe_ctx *c);
enum probe_status probe_overflow_status(struct probe_ctx *c);
enum probe_status probe_rdpmc(struct probe_ctx *c);
enum probe_status probe_event_filter(struct probe_ctx *c);
enum probe_status probe_filter_update(struct probe_ctx *c);
enum probe_status probe_filter_invalid(struct probe_ctx *c);
enum probe_status probe_pmi(struct probe_ctx *c);
enum probe_status probe_hidden_counters(struct probe_ctx *c);
enum probe_status probe_pmu_enum(struct probe_ctx *c);
enum probe_status probe_guards(struct probe_ctx *c);
enum probe_status probe_fixed_counters(struct probe_ctx *c);
enum probe_status probe_counter_freeze(struct probe_ctx *c);
enum probe_status probe_all_counters(struct probe_ctx *c);
enum probe_status probe_cmask(struct probe_ctx *c);
enum probe_status probe_running_write(struct probe_ctx *c);
enum probe_status probe_privilege(struct probe_ctx *c);
enum probe_status probe_umask_pair(struct probe_ctx *c);
enum probe_status probe_legacy_k7(struct probe_ctx *c);
enum probe_status probe_masked_events(struct probe_ctx *c);
enum probe_status probe_filter_fixed_bitmap(struct probe_ctx *c);
enum probe_status probe_overflow_all(struct probe_ctx *c);

#endif
