/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The contract between the host VMM (lib/vm.c) and the guest program (guest/): guest-physical
 * layout, the I/O ports of the guest->host channel, and the per-vCPU mailbox.  Included by both
 * sides, so it uses only <stdint.h> and no host types.
 *
 * Model: the guest is a tiny command interpreter.  The host fills a batch of commands in the
 * vCPU's mailbox and runs the vCPU; the guest executes them in order, stores the results next to
 * each command and signals PORT_DONE.  Probe logic lives on the host; only the measured loops are
 * hand-written assembly (guest/entry.S) so that their instruction/branch counts are known exactly.
 */
#ifndef PMUFARM_GUEST_ABI_H
#define PMUFARM_GUEST_ABI_H

#ifndef __ASSEMBLER__
#include <stdint.h>
#endif

/* Guest-physical == guest-virtual (identity map, 2 MiB pages over the first GiB). */
#define GUEST_GDT           0x1000ULL
#define GUEST_TSS           0x2000ULL
#define GUEST_PML4          0x4000ULL
#define GUEST_PDPT          0x5000ULL
#define GUEST_PD            0x6000ULL
#define GUEST_CODE          0x100000ULL  /* guest/guest.lds links the blob here */
#define GUEST_CODE_MAX      0x100000ULL
#define GUEST_VECTORS       0x101000ULL  /* 256 x 16-byte stubs (guest/entry.S), fixed by guest.lds */
#define GUEST_VECTOR_STUB   16
#define GUEST_AREAS         0x200000ULL  /* per-vCPU areas, GUEST_AREA_SIZE each */
#define GUEST_AREA_SIZE     0x10000ULL   /* power of two: the guest finds its area as rsp & ~(size-1) */
#define GUEST_MAX_VCPUS     8
#define GUEST_MEM_SIZE      (GUEST_AREAS + GUEST_MAX_VCPUS * GUEST_AREA_SIZE)

#define GDT_CODE_SEL        0x08
#define GDT_DATA_SEL        0x10
#define GDT_TSS_SEL         0x18
#define GDT_UDATA_SEL       0x2b   /* index 5, RPL 3 */
#define GDT_UCODE_SEL       0x33   /* index 6, RPL 3 */
#define GDT_ENTRIES         7
#define TSS_RSP0            (GUEST_TSS + 4)

/* Guest->host channel: an OUT to one of these ports exits to the host (KVM_EXIT_IO). */
#define PORT_DONE           0xe0   /* batch finished; value = commands executed */
#define PORT_TICK           0xe1   /* one forced VM-exit inside a loop; value = loop payload */
#define PORT_FATAL          0xe2   /* unexpected exception; value = vector (details in the area) */

#ifndef __ASSEMBLER__
/* Guest commands.  arg[]/out[] meaning per op is given next to each. */
enum guest_op {
	OP_NOP = 0,
	OP_RDMSR,          /* arg0 = msr                       -> out0 = value, vector */
	OP_WRMSR,          /* arg0 = msr, arg1 = value         -> vector */
	OP_RDPMC,          /* arg0 = ecx                       -> out0 = value, vector */
	OP_CPUID,          /* arg0 = leaf, arg1 = subleaf      -> out0..3 = eax, ebx, ecx, edx */
	OP_SELFTEST,       /* arg0 = N: N ticks carrying i, sum -> out0 = sum(i), out1 = ticks sent */
	OP_MEASURE,        /* arg0 = msr, arg1 = enable value, arg2 = disable value, arg3 = N,
			      arg4 = MEASURE_LOOP_*: the loop body; see guest_measure() */
	OP_WORK,           /* arg0 = inner iterations, arg1 = exits; see guest_work() */
	OP_TICK,           /* one VM-exit to the host */
	OP_STI,            /* enable interrupts */
	OP_CLI,            /* disable interrupts */
	OP_SPIN,           /* arg0 = iterations of pause (interrupt window) */
	OP_X2APIC_ENABLE,  /* IA32_APIC_BASE: EN | EXTD; software-enable via SVR -> vector */
	OP_MEMLOOP,        /* arg0 = N x {load, store, read-modify-write} on one stack word */
	OP_MEASURE_USER,   /* like OP_MEASURE, but the loop is N x {DEC, JNZ} at CPL3; msr 0: no
			      WRMSR, the CPL3 round trip alone; see guest_measure_user() */
	OP_MAX
};

struct guest_cmd {
	uint32_t op;
	int32_t vector;        /* exception vector taken by the op, -1 if none */
	uint64_t arg[5];
	uint64_t out[4];
};

struct guest_exc {
	uint32_t vector;
	uint32_t fixed_up;     /* 1: expected (an *_safe op), the guest resumed after it */
	uint64_t rip;
	uint64_t error_code;
};

#define GUEST_MAX_CMDS      256
#define GUEST_MAX_EXC       64
#define GUEST_AREA_MAGIC    0x766d7075666172ULL  /* "vmpufar" */

/* Lives at the bottom of each vCPU area; the stack grows down from the top of the area. */
struct guest_area {
	uint64_t magic;
	uint32_t vcpu_id;
	uint32_t ncmds;
	volatile uint64_t fixup_rip;     /* non-zero: resume here after an exception */
	volatile int32_t fault_vector;
	uint32_t nexc;                   /* exceptions taken (may exceed GUEST_MAX_EXC) */
	struct guest_exc exc[GUEST_MAX_EXC];
	volatile uint64_t irq_count;     /* external interrupts taken (vector >= 32) */
	volatile uint32_t last_irq_vector;
	uint32_t x2apic;                 /* 1 once OP_X2APIC_ENABLE succeeded: EOI via MSR */
	struct guest_cmd cmds[GUEST_MAX_CMDS];
};

#endif /* __ASSEMBLER__ */

#define GUEST_IDT_OFFSET    0x8000ULL   /* per-vCPU IDT inside the area (4 KiB) */
#define GUEST_STACK_TOP     GUEST_AREA_SIZE

/*
 * Exact cost of the measured loops in guest/entry.S, counted from the code (like the selftests'
 * NUM_INSNS_RETIRED).  The window opens when the enabling WRMSR retires and closes with the
 * disabling WRMSR, which is itself counted.  guest_measure() per iteration: OUT (or NOP), DEC,
 * JNZ; after the loop: 4 register moves + WRMSR.  AMD additionally counts VMRUN as a branch and
 * some Intel Atoms overcount on VM transitions: those are errata, judged by the suites.
 */
#define MEASURE_LOOP_PLAIN         0   /* NOP, DEC, JNZ */
#define MEASURE_LOOP_EXIT          1   /* OUT (a forced VM-exit), DEC, JNZ */
#define MEASURE_LOOP_CLFLUSH       2   /* CLFLUSH, MFENCE, MOV load, DEC, JNZ (pmu_counters_test.c) */
#define MEASURE_INSNS_PER_ITER     3
#define MEASURE_CLFLUSH_INSNS_PER_ITER 5
#define MEASURE_USER_INSNS_PER_ITER 2   /* DEC, JNZ at CPL3 */
#define MEASURE_INSNS_EXTRA        5
#define MEASURE_BRANCHES_PER_ITER  1
#define MEASURE_BRANCHES_EXTRA     0
/* guest_work(): per exit: MOV, then inner x (DEC, JNZ), then OUT, DEC, JNZ. */
#define WORK_INSNS(inner, exits)   ((exits) * (2 * (inner) + 4))

#endif
