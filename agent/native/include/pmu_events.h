/* SPDX-License-Identifier: GPL-2.0 */
/*
 * THE event encodings table (docs/contracts.md §8); agent/facts/vendors.py is its Python twin.
 * X-macros so that one list feeds every table in lib/pmu.c: X(name, event select, unit mask).
 * Sources: Intel SDM Vol. 3B "Pre-defined Architectural Performance Events" (CPUID.0AH:EBX bit
 * order); AMD PPR for family 17h+ core PMC events (PMCx076, PMCx0C0, PMCx0C2, PMCx0C3).
 */
#ifndef PMUFARM_PMU_EVENTS_H
#define PMUFARM_PMU_EVENTS_H

/* Intel architectural events, index = CPUID.0AH:EBX bit ("event unavailable"). */
#define INTEL_ARCH_EVENTS(X)				\
	X(cycles,            0x3c, 0x00)		\
	X(instructions,      0xc0, 0x00)		\
	X(ref_cycles,        0x3c, 0x01)		\
	X(llc_references,    0x2e, 0x4f)		\
	X(llc_misses,        0x2e, 0x41)		\
	X(branches,          0xc4, 0x00)		\
	X(branch_misses,     0xc5, 0x00)		\
	X(topdown_slots,     0xa4, 0x01)		\
	X(topdown_be_bound,  0xa4, 0x02)		\
	X(topdown_bad_spec,  0x73, 0x00)		\
	X(topdown_fe_bound,  0x9c, 0x01)		\
	X(topdown_retiring,  0xc2, 0x02)		\
	X(lbr_inserts,       0xe4, 0x01)

/* Intel fixed counters: FCi counts the named architectural event. */
#define INTEL_FIXED_EVENTS(X)	\
	X(instructions)		\
	X(cycles)		\
	X(ref_cycles)		\
	X(topdown_slots)	\
	X(topdown_bad_spec)	\
	X(topdown_fe_bound)	\
	X(topdown_retiring)

/* AMD (Zen) core events used by the probes. */
#define AMD_EVENTS(X)				\
	X(cycles,         0x76, 0x00)		\
	X(instructions,   0xc0, 0x00)		\
	X(branches,       0xc2, 0x00)		\
	X(branch_misses,  0xc3, 0x00)

/*
 * Memory events of the masked-event tests, in the order loads, stores, loads+stores
 * (pmu_event_filter_test.c: Intel MEM_INST_RETIRED 0xd0 umask 0x81/0x82/0x83; AMD LS_DISPATCH
 * 0x29 umask bit 0 load, bit 1 store, bit 2 load-op-store).
 */
#define INTEL_MEM_EVENTS(X)				\
	X(mem_loads,         0xd0, 0x81)		\
	X(mem_stores,        0xd0, 0x82)		\
	X(mem_loads_stores,  0xd0, 0x83)
#define AMD_MEM_EVENTS(X)				\
	X(mem_loads,         0x29, 0x01)		\
	X(mem_stores,        0x29, 0x02)		\
	X(mem_loads_stores,  0x29, 0x04)

#endif
