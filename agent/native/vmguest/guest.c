// SPDX-License-Identifier: GPL-2.0
/*
 * The guest program: a freestanding command interpreter linked at GUEST_CODE (guest/guest.lds)
 * and embedded in the host binary as a flat blob.  Its IDT (built by the host) records every
 * exception; the *_safe helpers register a fixup address first, so a #GP on a PMU MSR is
 * an observation rather than a triple fault.  Built without SSE (-mgeneral-regs-only) and without
 * a red zone, because interrupts arrive on the same stack.
 */
#include <stddef.h>
#include <stdint.h>

#include "guest_abi.h"

void guest_main(struct guest_area *area);
void guest_trap(uint64_t *frame);
void guest_measure(uint32_t msr, uint64_t on, uint64_t off, uint64_t n, uint64_t exit_each);
void guest_work(uint64_t inner, uint64_t exits);
void guest_measure_user(uint32_t msr, uint64_t on, uint64_t off, uint64_t n);
extern const char user_exit[], user_return[];

#define X2APIC_EOI   0x80b
#define X2APIC_SVR   0x80f
#define MSR_APIC_BASE 0x1b

/* The compiler may emit these for struct copies even in freestanding mode. */
void *memset(void *d, int c, size_t n)
{
	unsigned char *p = d;

	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	unsigned char *p = d;
	const unsigned char *q = s;

	while (n--)
		*p++ = *q++;
	return d;
}

static inline struct guest_area *this_area(void)
{
	uint64_t sp;

	asm volatile("mov %%rsp, %0" : "=r"(sp));
	return (struct guest_area *)(sp & ~(GUEST_AREA_SIZE - 1));
}

static inline void outl(uint16_t port, uint32_t v)
{
	asm volatile("out %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

/*
 * The *_safe helpers: publish the address right after the instruction as fixup_rip; if the
 * instruction faults, guest_trap() records the vector and resumes there.  They return the
 * vector, or -1 when the instruction completed.
 */
static int rdmsr_safe(uint32_t msr, uint64_t *val)
{
	struct guest_area *a = this_area();
	uint32_t lo = 0, hi = 0;

	a->fault_vector = -1;
	asm volatile("leaq 1f(%%rip), %%r11\n\t"
		     "movq %%r11, %[fx]\n\t"
		     "rdmsr\n"
		     "1:\n\t"
		     "movq $0, %[fx]"
		     : "+a"(lo), "+d"(hi), [fx] "+m"(a->fixup_rip)
		     : "c"(msr)
		     : "r11", "memory");
	*val = ((uint64_t)hi << 32) | lo;
	return a->fault_vector;
}

static int wrmsr_safe(uint32_t msr, uint64_t val)
{
	struct guest_area *a = this_area();

	a->fault_vector = -1;
	asm volatile("leaq 1f(%%rip), %%r11\n\t"
		     "movq %%r11, %[fx]\n\t"
		     "wrmsr\n"
		     "1:\n\t"
		     "movq $0, %[fx]"
		     : [fx] "+m"(a->fixup_rip)
		     : "c"(msr), "a"((uint32_t)val), "d"((uint32_t)(val >> 32))
		     : "r11", "memory");
	return a->fault_vector;
}

static int rdpmc_safe(uint32_t idx, uint64_t *val)
{
	struct guest_area *a = this_area();
	uint32_t lo = 0, hi = 0;

	a->fault_vector = -1;
	asm volatile("leaq 1f(%%rip), %%r11\n\t"
		     "movq %%r11, %[fx]\n\t"
		     "rdpmc\n"
		     "1:\n\t"
		     "movq $0, %[fx]"
		     : "+a"(lo), "+d"(hi), [fx] "+m"(a->fixup_rip)
		     : "c"(idx)
		     : "r11", "memory");
	*val = ((uint64_t)hi << 32) | lo;
	return a->fault_vector;
}

static void cpuid(uint32_t leaf, uint32_t sub, uint64_t out[4])
{
	uint32_t a, b, c, d;

	asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
	out[0] = a;
	out[1] = b;
	out[2] = c;
	out[3] = d;
}

/* Frame layout pushed by trap_common + the stub + the CPU. */
enum { F_R15, F_R14, F_R13, F_R12, F_R11, F_R10, F_R9, F_R8, F_RBP, F_RDI, F_RSI, F_RDX,
       F_RCX, F_RBX, F_RAX, F_VECTOR, F_ERROR, F_RIP, F_CS, F_RFLAGS, F_RSP, F_SS };

void guest_trap(uint64_t *frame)
{
	struct guest_area *a = this_area();
	uint32_t vector = (uint32_t)frame[F_VECTOR];

	if (vector == 6 && frame[F_RIP] == (uint64_t)user_exit) {
		/* The CPL3 loop's way back (guest_measure_user): resume at CPL0 on its saved stack. */
		frame[F_RIP] = (uint64_t)user_return;
		frame[F_CS] = GDT_CODE_SEL;
		frame[F_RFLAGS] = 0x2;
		frame[F_RSP] = *(volatile uint64_t *)TSS_RSP0;
		frame[F_SS] = GDT_DATA_SEL;
		return;
	}
	if (vector >= 32) {
		/* External interrupt (PMI via LVTPC, or spurious): count it and EOI. */
		a->irq_count++;
		a->last_irq_vector = vector;
		if (a->x2apic && vector != 0xff)
			asm volatile("wrmsr" : : "c"(X2APIC_EOI), "a"(0), "d"(0));
		return;
	}

	if (a->nexc < GUEST_MAX_EXC) {
		struct guest_exc *e = &a->exc[a->nexc];

		e->vector = vector;
		e->rip = frame[F_RIP];
		e->error_code = frame[F_ERROR];
		e->fixed_up = a->fixup_rip != 0;
	}
	a->nexc++;

	if (a->fixup_rip) {
		frame[F_RIP] = a->fixup_rip;
		a->fault_vector = (int32_t)vector;
		a->fixup_rip = 0;
		return;
	}
	/* Unexpected: tell the host and never return to the faulting code. */
	for (;;)
		outl(PORT_FATAL, vector);
}

static void run_cmd(struct guest_area *a, struct guest_cmd *c)
{
	c->vector = -1;
	switch (c->op) {
	case OP_NOP:
		break;
	case OP_RDMSR:
		c->vector = rdmsr_safe((uint32_t)c->arg[0], &c->out[0]);
		break;
	case OP_WRMSR:
		c->vector = wrmsr_safe((uint32_t)c->arg[0], c->arg[1]);
		break;
	case OP_RDPMC:
		c->vector = rdpmc_safe((uint32_t)c->arg[0], &c->out[0]);
		break;
	case OP_CPUID:
		cpuid((uint32_t)c->arg[0], (uint32_t)c->arg[1], c->out);
		break;
	case OP_SELFTEST: {
		uint64_t sum = 0, i;

		for (i = 0; i < c->arg[0]; i++) {
			outl(PORT_TICK, (uint32_t)i);
			sum += i;
		}
		c->out[0] = sum;
		c->out[1] = i;
		break;
	}
	case OP_MEASURE:
		/* A safe write of the "off" value first: a #GP becomes this op's vector. */
		c->vector = wrmsr_safe((uint32_t)c->arg[0], c->arg[2]);
		if (c->vector < 0 && c->arg[3])
			guest_measure((uint32_t)c->arg[0], c->arg[1], c->arg[2], c->arg[3], c->arg[4]);
		break;
	case OP_MEASURE_USER:
		c->vector = c->arg[0] ? wrmsr_safe((uint32_t)c->arg[0], c->arg[2]) : -1;
		if (c->vector < 0 && c->arg[3])
			guest_measure_user((uint32_t)c->arg[0], c->arg[1], c->arg[2], c->arg[3]);
		break;
	case OP_WORK:
		if (c->arg[0] && c->arg[1])
			guest_work(c->arg[0], c->arg[1]);
		break;
	case OP_TICK:
		outl(PORT_TICK, 0);
		break;
	case OP_STI:
		asm volatile("sti; nop" ::: "memory");
		break;
	case OP_CLI:
		asm volatile("cli" ::: "memory");
		break;
	case OP_SPIN:
		for (uint64_t i = 0; i < c->arg[0]; i++)
			asm volatile("pause" ::: "memory");
		break;
	case OP_MEMLOOP: {
		/* Loads, stores and read-modify-writes for the masked-event cases (LS_DISPATCH /
		 * MEM_INST_RETIRED umasks), like pmu_event_filter_test.c's masked-events guest. */
		volatile uint64_t word = 0;

		for (uint64_t i = 0; i < c->arg[0]; i++) {
			uint64_t x = word;

			word = x + 1;
			asm volatile("addq $1, %0" : "+m"(word));
		}
		c->out[0] = word;
		break;
	}
	case OP_X2APIC_ENABLE: {
		uint64_t base;

		c->vector = rdmsr_safe(MSR_APIC_BASE, &base);
		if (c->vector < 0)
			c->vector = wrmsr_safe(MSR_APIC_BASE, base | (1ULL << 11) | (1ULL << 10));
		if (c->vector < 0)
			c->vector = wrmsr_safe(X2APIC_SVR, 0x1ff);  /* enable, spurious vector 0xff */
		if (c->vector < 0)
			a->x2apic = 1;
		break;
	}
	default:
		c->vector = 6;  /* report an unknown op like #UD */
		break;
	}
}

/*
 * The host has already loaded this vCPU's IDT (building it in the guest cost ~3600 instructions,
 * which a software-emulating KVM such as PVM executes one exit at a time).
 */
void guest_main(struct guest_area *a)
{
	for (;;) {
		uint32_t n = a->ncmds;

		for (uint32_t i = 0; i < n && i < GUEST_MAX_CMDS; i++)
			run_cmd(a, &a->cmds[i]);
		outl(PORT_DONE, n);
	}
}
