/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Guest entry, exception/interrupt stubs and the measured loops.  The measured loops are
 * assembly on purpose: their instruction and branch counts are part of the probe contract
 * (MEASURE_* / WORK_INSNS in include/guest_abi.h) and must not depend on the compiler.
 */
#include "guest_abi.h"

	.section .text.entry, "ax"
	.code64
	.globl _start
_start:
	/* The host sets rsp to the top of this vCPU's area and rdi to the area itself. */
	xor %ebp, %ebp
	call guest_main
1:	mov $PORT_FATAL, %dx
	mov $0xffff, %eax
	out %eax, (%dx)
	jmp 1b

	.section .text.vectors, "ax"
/*
 * One 16-byte stub per vector: push a dummy error code where the CPU pushes none, push the
 * vector, jump to the common path.  The host (lib/vm.c) points IDT entry v at
 * GUEST_VECTORS + 16 * v; guest.lds pins guest_vectors there.
 */
.macro vector_stub v
	.align 16
	.if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
	.else
	pushq $0
	.endif
	pushq $\v
	jmp trap_common
.endm

	.align 16
	.globl guest_vectors
guest_vectors:
	.altmacro
	.set vec, 0
	.rept 256
	vector_stub %vec
	.set vec, vec + 1
	.endr
	.noaltmacro

	.text
trap_common:
	push %rax
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rdi
	cld
	call guest_trap		/* 22 quadwords pushed since the 16-byte aligned frame start */
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
	add $16, %rsp		/* vector + error code */
	iretq

/*
 * void guest_measure(uint32_t msr, uint64_t on, uint64_t off, uint64_t n, uint64_t mode)
 *   rdi = msr, rsi = on, rdx = off, rcx = n (>= 1), r8 = MEASURE_LOOP_*
 * WRMSR(msr, on) opens the window; n iterations of the body; then 4 moves and WRMSR(msr, off).
 * Complete copies per body, so the choice costs nothing inside the window: plain and exit
 * bodies are 3 instructions, the clflush body 5 (the selftest's "flush the line to force LLC
 * references and misses", with MFENCE and a load of the flushed line); MEASURE_INSNS_EXTRA = 5,
 * one branch (JNZ) per iteration.
 */
	.globl guest_measure
guest_measure:
	mov %rdx, %r9		/* off */
	mov %rcx, %r10		/* n */
	mov %edi, %ecx
	mov %esi, %eax
	mov %rsi, %rdx
	shr $32, %rdx
	cmp $MEASURE_LOOP_CLFLUSH, %r8
	je 4f
	test %r8, %r8
	jz 2f
	wrmsr			/* ---- window opens after this retires ---- */
1:	out %eax, $PORT_TICK	/* forced VM-exit; KVM emulates it and counts it as retired */
	dec %r10
	jnz 1b
	mov %edi, %ecx
	mov %r9d, %eax
	mov %r9, %rdx
	shr $32, %rdx
	wrmsr			/* ---- counted; window closes ---- */
	ret
2:	wrmsr			/* ---- window opens after this retires ---- */
3:	nop
	dec %r10
	jnz 3b
	mov %edi, %ecx
	mov %r9d, %eax
	mov %r9, %rdx
	shr $32, %rdx
	wrmsr			/* ---- counted; window closes ---- */
	ret
4:	wrmsr			/* ---- window opens after this retires ---- */
5:	clflush (%rsp)		/* the return address's line: flushed, then loaded again */
	mfence
	mov (%rsp), %r11
	dec %r10
	jnz 5b
	mov %edi, %ecx
	mov %r9d, %eax
	mov %r9, %rdx
	shr $32, %rdx
	wrmsr			/* ---- counted; window closes ---- */
	ret

/*
 * void guest_measure_user(uint32_t msr, uint64_t on, uint64_t off, uint64_t n)
 *   rdi = msr, rsi = on, rdx = off, rcx = n (>= 1)
 * WRMSR(msr, on) opens the window; IRETQ to CPL3, n x {DEC, JNZ}, then UD2 at user_exit: the #UD
 * enters CPL0 on TSS.RSP0 and guest_trap() sends it to user_return with this stack; reload the
 * data segments, 4 moves, WRMSR(msr, off).  (A software INT through a DPL-3 gate would be the
 * usual way back, but PVM answers it with #UD.)  The user part is MEASURE_USER_INSNS_PER_ITER * n;
 * the kernel part is the same for every n, so loops of n and 2n tell them apart.
 */
	.globl guest_measure_user
guest_measure_user:
	push %rbp
	mov %rsp, %rbp
	and $-16, %rsp
	mov %rdx, %r9		/* off */
	mov %rcx, %r10		/* n */
	mov %rsp, TSS_RSP0	/* the #UD from CPL3 enters CPL0 below here; guest_trap returns here */
	mov %rsp, %r11
	sub $256, %r11		/* the user loop touches no stack; any mapped address will do */
	mov %edi, %ecx
	mov %esi, %eax
	mov %rsi, %rdx
	shr $32, %rdx
	test %ecx, %ecx		/* msr 0: no window, just the CPL3 round trip (selftest) */
	jz 2f
	wrmsr			/* ---- window opens after this retires ---- */
2:	pushq $GDT_UDATA_SEL
	push %r11
	pushq $0x2		/* RFLAGS: IF clear */
	pushq $GDT_UCODE_SEL
	lea 1f(%rip), %rax
	push %rax
	iretq
1:	dec %r10		/* CPL3 */
	jnz 1b
	.globl user_exit
user_exit:
	ud2
	.globl user_return
user_return:
	mov $GDT_DATA_SEL, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov %edi, %ecx
	mov %r9d, %eax
	mov %r9, %rdx
	shr $32, %rdx
	test %ecx, %ecx
	jz 3f
	wrmsr			/* ---- counted; window closes ---- */
3:	mov %rbp, %rsp
	pop %rbp
	ret

/*
 * void guest_work(uint64_t inner, uint64_t exits)
 * exits x { MOV; inner x {DEC, JNZ}; OUT; DEC; JNZ }  -> WORK_INSNS(inner, exits) instructions.
 * Not a PMU window: the host compares its own exclude_guest count across two sizes.
 */
	.globl guest_work
guest_work:
1:	mov %rdi, %rcx
2:	dec %rcx
	jnz 2b
	out %al, $PORT_TICK
	dec %rsi
	jnz 1b
	ret
