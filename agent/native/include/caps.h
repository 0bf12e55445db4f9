/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Host facts the harness needs before touching the PMU: CPU vendor and PMU enumeration (host
 * CPUID and KVM_GET_SUPPORTED_CPUID), KVM module parameters, KVM capabilities, and the mediated
 * vPMU verdict with one reason per missing fact (vpmu.md §1.3). The verdict's rules, texts and
 * order are agent/facts/rules.py's (via the generated verdict_rules.h), the same as the Python
 * verdict's; $PMUFARM_SYSROOT prefixes the /sys and /proc files read (tests only).
 */
#ifndef PMUFARM_CAPS_H
#define PMUFARM_CAPS_H

#include <stdbool.h>
#include <stdint.h>

#include "json.h"
#include "pmu.h"

#define CAPS_MAX_REASONS 12
#define CAPS_REASON_LEN  192

struct kvm_cpuid2;

struct host_caps {
	char vendor_id[13];
	const struct pmu_layout *layout;    /* NULL: unknown vendor */
	int family, model, stepping;
	bool hypervisor;
	struct pmu_info host_pmu;           /* host CPUID */
	struct pmu_info kvm_pmu;            /* KVM_GET_SUPPORTED_CPUID = what our guests see */
	int64_t perf_capabilities;          /* IA32_PERF_CAPABILITIES via /dev/cpu/0/msr, -1 unknown */

	bool dev_kvm;                       /* /dev/kvm opened */
	int dev_kvm_errno;
	int enable_pmu;                     /* kvm.enable_pmu: 1/0, -1 unknown */
	int enable_mediated_pmu;            /* <vendor module>.enable_mediated_pmu: 1/0, -1 absent */
	bool vendor_module_loaded;          /* /sys/module/kvm_intel or kvm_amd exists */
	char kvm_modules[160];              /* loaded kvm_* modules, sorted, ", "-separated */
	char release[65];                   /* uname -r */
	int nmi_watchdog;                   /* /proc/sys/kernel/nmi_watchdog, -1 unknown */
	int ignore_msrs;                    /* kvm.ignore_msrs: 1/0, -1 unknown */
	int vcpu_errno;                     /* trial KVM_CREATE_VCPU with irqchip: errno, 0 ok, -1 not tried */
	int cap_pmu_capability;             /* KVM_CHECK_EXTENSION values, -1 if not asked */
	int cap_pmu_event_filter;
	int cap_irqchip;
	struct kvm_cpuid2 *kvm_cpuid;

	int nreasons;                       /* mediated vPMU is usable iff nreasons == 0 */
	char reasons[CAPS_MAX_REASONS][CAPS_REASON_LEN];
	int ncaveats;                       /* checks this host cannot make (kvm.ignore_msrs=Y) */
	char caveats[CAPS_MAX_REASONS][CAPS_REASON_LEN];
};

/* Never fails: unknown facts stay unknown and become reasons. */
void caps_collect(struct host_caps *c);
void caps_free(struct host_caps *c);
/* The reasons joined with "; " (empty string when the mediated vPMU is usable). */
void caps_reason(const struct host_caps *c, char *out, size_t len);
/* `vpmu caps`: one JSON object; runs a tiny VM to check the guest exception path. */
void caps_json(struct host_caps *c, struct json *j);
void pmu_info_json(const struct pmu_layout *l, const struct pmu_info *p, struct json *j,
		   const char *key);

#endif
