/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The emulated PMU: the guest-visible PMU that KVM's mediated vPMU presents, implemented in this
 * VMM for hosts without a usable PMU, so the unmodified probes run their MSR sequences end to end.
 *
 * Selected at run time by PMUFARM_EPMU=LAYOUT (`vpmu --pmu emulated[:LAYOUT] ...` sets it).  In
 * emulated mode the emulated PMU plays the HOST: caps, KVM's supported CPUID and the host
 * PERF_CAPABILITIES are the layout's; the guest's PMU is then derived from the CPUID actually set
 * on each vCPU, as KVM's refresh does.  Mechanism (all plain KVM uAPI):
 *   - KVM_X86_SET_MSR_FILTER denying the PMU MSR ranges + KVM_CAP_X86_USER_SPACE_MSR: every guest
 *     RDMSR/WRMSR of them exits here (error=1 injects #GP);
 *   - KVM_SET_GUEST_DEBUG single-step while a counter is enabled: one exit per retired instruction;
 *     branches are recognised by decoding (libcapstone; only this mode needs it);
 *   - hardware execute breakpoints on the guest's RDPMC instructions: emulated and stepped over;
 *   - overflow PMIs through the LVTPC read with KVM_GET_LAPIC, delivered by KVM_SIGNAL_MSI/KVM_NMI.
 * Faults (PMUFARM_EPMU_FAULTS=a,b) and errata symptoms (PMUFARM_EPMU_ERRATA=a,b) bend it on purpose.
 */
#ifndef PMUFARM_EPMU_H
#define PMUFARM_EPMU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct host_caps;
struct kvm_cpuid2;
struct vm;
struct vcpu;

#define EPMU_ENV         "PMUFARM_EPMU"
#define EPMU_ENV_FAULTS  "PMUFARM_EPMU_FAULTS"
#define EPMU_ENV_ERRATA  "PMUFARM_EPMU_ERRATA"

/* PMUFARM_EPMU is set (even to an unknown layout: epmu_check() then says so). */
bool epmu_active(void);
/* 0 when emulated mode can run here; -1 with one line in err (unknown layout/fault, no decoder). */
int epmu_check(char *err, size_t len);
/* The reason a probe cannot run on the emulated PMU (host-side probes), or NULL. */
const char *epmu_probe_unsupported(const char *probe);
/* `vpmu layouts`-style list for messages: "intel, intel-v5, amd". */
const char *epmu_layout_names(void);

/* Hooks (no-ops unless epmu_active()). */
void epmu_caps(struct host_caps *c);                    /* caps_collect(), before the verdict */
int epmu_supported_cpuid(struct kvm_cpuid2 **table);    /* rewrite KVM_GET_SUPPORTED_CPUID; 0/errno */
int epmu_vm_init(struct vm *vm);                        /* vm_create(): MSR filter; 0 or -1 + vm->err */
int epmu_vm_pmu_disable(struct vm *vm);                 /* KVM_CAP_PMU_CAPABILITY(DISABLE) semantics */
void epmu_vm_destroy(struct vm *vm);
int epmu_vcpu_init(struct vcpu *v);                     /* vcpu_add() after KVM_SET_CPUID2; 0 or errno */
/* KVM's feature MSRs (KVM_GET_MSRS on /dev/kvm) as the emulated host has them: 0, or -1 = not ours. */
int epmu_feature_msr(uint32_t msr, uint64_t *val);
/* Host-initiated KVM_GET/SET_MSRS of a PMU MSR: 0, EINVAL (refused), or -1 = not a PMU MSR. */
int epmu_host_msr(struct vcpu *v, uint32_t msr, uint64_t *val, bool write);
/* batch_run() start: the host may have changed the event filter while the vCPU was out. */
int epmu_run_start(struct vcpu *v);
/* Exit handling inside batch_run(): 1 = handled (resume), 0 = not ours, -1 = error (vm->err). */
int epmu_exit(struct vcpu *v);
/* A port-I/O exit of the guest (the OUT retired; KVM gives it no step exit): 0, or -1 (vm->err). */
int epmu_io_exit(struct vcpu *v);

#endif
