// SPDX-License-Identifier: GPL-2.0
/* Minimal KVM VMM; see include/vm.h. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "epmu.h"
#include "vm.h"

extern const char guest_blob_start[], guest_blob_end[];

_Static_assert(sizeof(struct guest_area) <= GUEST_IDT_OFFSET, "guest_area overlaps the IDT");
_Static_assert(GUEST_IDT_OFFSET + 0x1000 < GUEST_STACK_TOP, "no room for the guest stack");

#define CR0_PE (1ULL << 0)
#define CR0_MP (1ULL << 1)
#define CR0_ET (1ULL << 4)
#define CR0_NE (1ULL << 5)
#define CR0_WP (1ULL << 16)
#define CR0_PG (1ULL << 31)
#define CR4_PAE (1ULL << 5)
#define CR4_OSFXSR (1ULL << 9)
#define CR4_OSXMMEXCPT (1ULL << 10)
#define EFER_LME (1ULL << 8)
#define EFER_LMA (1ULL << 10)
#define PTE_P (1ULL << 0)
#define PTE_RW (1ULL << 1)
#define PTE_US (1ULL << 2)
#define PTE_PS (1ULL << 7)

__attribute__((format(printf, 2, 3)))
static int fail(struct vm *vm, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(vm->err, sizeof(vm->err), fmt, ap);
	va_end(ap);
	return -1;
}

const char *irqchip_name(enum irqchip_mode m)
{
	return m == IRQCHIP_FULL ? "full" : m == IRQCHIP_SPLIT ? "split" : m == IRQCHIP_NONE ? "none" : "default";
}

static enum irqchip_mode resolve_irqchip(enum irqchip_mode m)
{
	const char *env = getenv("PMUFARM_IRQCHIP");

	if (m != IRQCHIP_DEFAULT)
		return m;
	if (env && !strcmp(env, "full"))
		return IRQCHIP_FULL;
	if (env && !strcmp(env, "none"))
		return IRQCHIP_NONE;
	return IRQCHIP_SPLIT;
}

static void setup_memory_image(struct vm *vm)
{
	uint64_t *gdt = (uint64_t *)(vm->mem + GUEST_GDT);
	uint64_t *pml4 = (uint64_t *)(vm->mem + GUEST_PML4);
	uint64_t *pdpt = (uint64_t *)(vm->mem + GUEST_PDPT);
	uint64_t *pd = (uint64_t *)(vm->mem + GUEST_PD);
	uint64_t tss = GUEST_TSS, tss_limit = 0x67;

	/* Identity map the first GiB with 2 MiB pages: code, areas and page tables all live there. */
	/* User-accessible too: OP_MEASURE_USER runs its loop at CPL3 (no SMEP/SMAP in CR4). */
	pml4[0] = GUEST_PDPT | PTE_P | PTE_RW | PTE_US;
	pdpt[0] = GUEST_PD | PTE_P | PTE_RW | PTE_US;
	for (uint64_t i = 0; i < 512; i++)
		pd[i] = (i << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS;

	gdt[0] = 0;
	gdt[1] = 0x00af9b000000ffffULL;   /* 64-bit code, DPL 0 */
	gdt[2] = 0x00cf93000000ffffULL;   /* data, DPL 0 */
	/* 64-bit TSS (16-byte descriptor): VMX requires a usable TR even if nothing uses it. */
	gdt[3] = (tss_limit & 0xffff) | ((tss & 0xffffff) << 16) | (0x89ULL << 40) |
		 (((tss_limit >> 16) & 0xf) << 48) | (((tss >> 24) & 0xff) << 56);
	gdt[4] = tss >> 32;
	gdt[5] = 0x00cff3000000ffffULL;   /* data, DPL 3 (GDT_UDATA_SEL) */
	gdt[6] = 0x00affb000000ffffULL;   /* 64-bit code, DPL 3 (GDT_UCODE_SEL) */

	memcpy(vm->mem + GUEST_CODE, guest_blob_start, (size_t)(guest_blob_end - guest_blob_start));
}

struct kvm_cpuid2 *kvm_supported_cpuid(int kvm_fd, char *err, size_t len)
{
	int nent = 256;

	for (;;) {
		struct kvm_cpuid2 *t = calloc(1, sizeof(*t) + (size_t)nent * sizeof(struct kvm_cpuid_entry2));

		if (!t) {
			snprintf(err, len, "out of memory");
			return NULL;
		}
		t->nent = (uint32_t)nent;
		if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, t) == 0) {
			/* Emulated PMU: it plays the host, so KVM "supports" its layout. */
			if (epmu_supported_cpuid(&t)) {
				free(t);
				snprintf(err, len, "out of memory");
				return NULL;
			}
			return t;
		}
		free(t);
		if (errno != E2BIG || nent >= 4096) {
			snprintf(err, len, "KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
			return NULL;
		}
		nent *= 2;
	}
}

/* One MSR through KVM_GET_MSRS/KVM_SET_MSRS on fd (a vCPU, or /dev/kvm for feature MSRs). */
static int msr_ioctl(int fd, unsigned long req, uint32_t msr, uint64_t *val)
{
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry e;
	} m;
	int r;

	memset(&m, 0, sizeof(m));
	m.hdr.nmsrs = 1;
	m.e.index = msr;
	m.e.data = *val;
	r = ioctl(fd, req, &m);
	if (r < 0)
		return errno;
	if (r != 1)
		return EINVAL;      /* KVM returns the number of MSRs processed: refused */
	*val = m.e.data;
	return 0;
}

int kvm_feature_msr(int kvm_fd, uint32_t msr, uint64_t *val)
{
	*val = 0;
	if (epmu_active() && epmu_feature_msr(msr, val) == 0)
		return 0;
	return msr_ioctl(kvm_fd, KVM_GET_MSRS, msr, val);
}

int vcpu_get_msr(struct vcpu *v, uint32_t msr, uint64_t *val)
{
	int e;

	*val = 0;
	if (v->epmu && (e = epmu_host_msr(v, msr, val, false)) >= 0)
		return e;
	return msr_ioctl(v->fd, KVM_GET_MSRS, msr, val);
}

int vcpu_set_msr(struct vcpu *v, uint32_t msr, uint64_t val)
{
	int e;

	if (v->epmu && (e = epmu_host_msr(v, msr, &val, true)) >= 0)
		return e;
	return msr_ioctl(v->fd, KVM_SET_MSRS, msr, &val);
}

int vm_create(struct vm *vm, const struct vm_opts *opts)
{
	struct kvm_userspace_memory_region region;
	size_t blob = (size_t)(guest_blob_end - guest_blob_start);

	memset(vm, 0, sizeof(*vm));
	vm->kvm_fd = vm->fd = -1;
	vm->pmu_cap_errno = -1;
	if (blob > GUEST_CODE_MAX)
		return fail(vm, "guest blob is %zu bytes, more than %llu", blob, GUEST_CODE_MAX);

	vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (vm->kvm_fd < 0)
		return fail(vm, "open /dev/kvm: %s", strerror(errno));
	vm->fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
	if (vm->fd < 0)
		return fail(vm, "KVM_CREATE_VM: %s", strerror(errno));
	vm->run_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (vm->run_size <= 0)
		return fail(vm, "KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));

	vm->mem_size = GUEST_MEM_SIZE;
	vm->mem = mmap(NULL, vm->mem_size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (vm->mem == MAP_FAILED) {
		vm->mem = NULL;
		return fail(vm, "mmap guest memory: %s", strerror(errno));
	}
	region = (struct kvm_userspace_memory_region){
		.slot = 0, .guest_phys_addr = 0, .memory_size = vm->mem_size,
		.userspace_addr = (uint64_t)(uintptr_t)vm->mem,
	};
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		return fail(vm, "KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));
	setup_memory_image(vm);

	/*
	 * The irqchip must exist before any vCPU: KVM decides on the mediated PMU at vCPU creation.
	 * It comes after the memslot because a memslot change once I/O devices are registered waits
	 * for an SRCU grace period (several ms), which dominated the harness's start-up time.
	 */
	vm->irqchip = opts->irqchip ? resolve_irqchip(opts->irqchip_mode) : IRQCHIP_NONE;
	if (vm->irqchip == IRQCHIP_FULL && ioctl(vm->fd, KVM_CREATE_IRQCHIP, 0) < 0)
		return fail(vm, "KVM_CREATE_IRQCHIP: %s", strerror(errno));
	if (vm->irqchip == IRQCHIP_SPLIT) {
		struct kvm_enable_cap cap = { .cap = KVM_CAP_SPLIT_IRQCHIP, .args = { 24 } };

		if (ioctl(vm->fd, KVM_ENABLE_CAP, &cap) < 0)
			return fail(vm, "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP): %s", strerror(errno));
	}
	if (epmu_vm_init(vm))
		return -1;
	if (opts->pmu_disable)
		vm->pmu_cap_errno = vm_pmu_cap_disable(vm);

	vm->cpuid = kvm_supported_cpuid(vm->kvm_fd, vm->err, sizeof(vm->err));
	if (!vm->cpuid)
		return -1;
	/* The VMM, not KVM, decides what the guest's CPUID enumerates (see struct guest_pmu_cfg). */
	if (opts->guest && opts->guest->layout) {
		vm->guest = *opts->guest;
		if (vm->guest.layout->encode(&vm->cpuid, &vm->guest.pmu, vm->guest.no_pmu))
			return fail(vm, "out of memory");
	}
	return 0;
}

int vm_pmu_cap_disable(struct vm *vm)
{
	struct kvm_enable_cap cap = { .cap = KVM_CAP_PMU_CAPABILITY, .args = { KVM_PMU_CAP_DISABLE } };

	if (vm->epmu)
		return epmu_vm_pmu_disable(vm);
	return ioctl(vm->fd, KVM_ENABLE_CAP, &cap) < 0 ? errno : 0;
}

void vm_destroy(struct vm *vm)
{
	epmu_vm_destroy(vm);
	for (int i = 0; i < vm->nvcpus; i++) {
		struct vcpu *v = vm->vcpus[i];

		if (v->run)
			munmap(v->run, (size_t)vm->run_size);
		if (v->fd >= 0)
			close(v->fd);
		free(v);
	}
	vm->nvcpus = 0;
	if (vm->fd >= 0)
		close(vm->fd);
	if (vm->kvm_fd >= 0)
		close(vm->kvm_fd);
	if (vm->mem)
		munmap(vm->mem, vm->mem_size);
	free(vm->cpuid);
	vm->cpuid = NULL;
	vm->mem = NULL;
	vm->fd = vm->kvm_fd = -1;
}

/* Per-vCPU CPUID: the supported table with this vCPU's APIC ID. */
static int set_cpuid(struct vcpu *v)
{
	struct kvm_cpuid2 *src = v->vm->cpuid;
	size_t sz = sizeof(*src) + src->nent * sizeof(src->entries[0]);
	struct kvm_cpuid2 *c = malloc(sz);
	int ret = 0;

	if (!c)
		return ENOMEM;
	memcpy(c, src, sz);
	for (uint32_t i = 0; i < c->nent; i++) {
		struct kvm_cpuid_entry2 *e = &c->entries[i];

		if (e->function == 1)
			e->ebx = (e->ebx & 0x00ffffffu) | ((uint32_t)v->id << 24);
		else if (e->function == 0xb || e->function == 0x1f)
			e->edx = (uint32_t)v->id;
	}
	if (ioctl(v->fd, KVM_SET_CPUID2, c) < 0)
		ret = errno;
	free(c);
	return ret;
}

/* 64-bit interrupt gates (DPL 0, no IST) to the guest's vector stubs. */
static void setup_idt(struct vm *vm, uint64_t area)
{
	uint64_t *idt = (uint64_t *)(vm->mem + area + GUEST_IDT_OFFSET);

	for (uint64_t vec = 0; vec < 256; vec++) {
		uint64_t h = GUEST_VECTORS + GUEST_VECTOR_STUB * vec;

		idt[2 * vec] = (h & 0xffff) | ((uint64_t)GDT_CODE_SEL << 16) | (0x8eULL << 40) |
			       ((h >> 16 & 0xffff) << 48);
		idt[2 * vec + 1] = h >> 32;
	}
}

static int setup_registers(struct vcpu *v)
{
	uint64_t area = GUEST_AREAS + (uint64_t)v->id * GUEST_AREA_SIZE;
	struct kvm_segment code = {
		.base = 0, .limit = 0xffffffff, .selector = GDT_CODE_SEL, .type = 11, .present = 1,
		.dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1,
	};
	struct kvm_segment data = {
		.base = 0, .limit = 0xffffffff, .selector = GDT_DATA_SEL, .type = 3, .present = 1,
		.dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
	};
	struct kvm_segment tr = {
		.base = GUEST_TSS, .limit = 0x67, .selector = GDT_TSS_SEL, .type = 11, .present = 1,
		.s = 0,
	};
	struct kvm_sregs sregs;
	struct kvm_regs regs;

	setup_idt(v->vm, area);
	if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
		return errno;
	sregs.cs = code;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
	sregs.tr = tr;
	sregs.gdt.base = GUEST_GDT;
	sregs.gdt.limit = GDT_ENTRIES * 8 - 1;
	sregs.idt.base = area + GUEST_IDT_OFFSET;
	sregs.idt.limit = 256 * 16 - 1;
	sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
	sregs.cr3 = GUEST_PML4;
	sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
	sregs.efer = EFER_LME | EFER_LMA;
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
		return errno;

	memset(&regs, 0, sizeof(regs));
	regs.rip = GUEST_CODE;
	regs.rsp = area + GUEST_STACK_TOP;
	regs.rdi = area;
	regs.rflags = 0x2;
	if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
		return errno;
	return 0;
}

int vcpu_add(struct vm *vm, int id, struct vcpu **out)
{
	struct vcpu *v;
	int e;

	if (id < 0 || id >= GUEST_MAX_VCPUS || vm->nvcpus >= GUEST_MAX_VCPUS) {
		fail(vm, "vCPU id %d out of range (max %d)", id, GUEST_MAX_VCPUS);
		return EINVAL;
	}
	v = calloc(1, sizeof(*v));
	if (!v) {
		fail(vm, "out of memory");
		return ENOMEM;
	}
	v->vm = vm;
	v->id = id;
	v->fd = ioctl(vm->fd, KVM_CREATE_VCPU, id);
	if (v->fd < 0) {
		e = errno;
		free(v);
		fail(vm, "KVM_CREATE_VCPU: %s", strerror(e));
		return e;
	}
	vm->vcpus[vm->nvcpus++] = v;
	v->run = mmap(NULL, (size_t)vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED) {
		v->run = NULL;
		e = errno;
		fail(vm, "mmap kvm_run: %s", strerror(e));
		return e;
	}
	e = set_cpuid(v);
	if (e) {
		fail(vm, "KVM_SET_CPUID2: %s", strerror(e));
		return e;
	}
	/*
	 * With an in-kernel LAPIC every vCPU but the BSP starts in wait-for-SIPI, and KVM_RUN would
	 * block forever: start the others runnable too (they run the same program, no INIT/SIPI).
	 */
	if (id != 0 && vm->irqchip != IRQCHIP_NONE) {
		struct kvm_mp_state mp = { .mp_state = KVM_MP_STATE_RUNNABLE };

		if (ioctl(v->fd, KVM_SET_MP_STATE, &mp) < 0) {
			e = errno;
			fail(vm, "KVM_SET_MP_STATE(RUNNABLE) on vCPU %d: %s", id, strerror(e));
			return e;
		}
	}
	e = epmu_vcpu_init(v);      /* the guest's emulated PMU follows the CPUID just set */
	if (e) {
		fail(vm, "emulated PMU vCPU setup: %s", strerror(e));
		return e;
	}
	/* Host-initiated, after KVM_SET_CPUID2 and before the first KVM_RUN, as vmx_pmu_caps_test.c. */
	if (vm->guest.layout && vm->guest.perf_capabilities >= 0) {
		e = vcpu_set_msr(v, MSR_IA32_PERF_CAPABILITIES, (uint64_t)vm->guest.perf_capabilities);
		if (e) {
			fail(vm, "KVM_SET_MSRS(IA32_PERF_CAPABILITIES=%#llx) refused: %s",
			     (unsigned long long)vm->guest.perf_capabilities, strerror(e));
			return e;
		}
	}
	e = setup_registers(v);
	if (e) {
		fail(vm, "vCPU register setup: %s", strerror(e));
		return e;
	}
	v->area = (struct guest_area *)(vm->mem + GUEST_AREAS + (uint64_t)id * GUEST_AREA_SIZE);
	memset(v->area, 0, sizeof(*v->area));
	v->area->magic = GUEST_AREA_MAGIC;
	v->area->vcpu_id = (uint32_t)id;
	*out = v;
	return 0;
}

void batch_begin(struct vcpu *v)
{
	v->area->ncmds = 0;
}

struct guest_cmd *batch_add(struct vcpu *v, uint32_t op, uint64_t a0, uint64_t a1, uint64_t a2,
			    uint64_t a3, uint64_t a4)
{
	static struct guest_cmd overflow;   /* sink for callers that overfill; batch_run reports it */
	struct guest_area *a = v->area;
	struct guest_cmd *c;

	if (a->ncmds >= GUEST_MAX_CMDS) {
		a->ncmds = GUEST_MAX_CMDS + 1;
		memset(&overflow, 0, sizeof(overflow));
		return &overflow;
	}
	c = &a->cmds[a->ncmds++];
	memset(c, 0, sizeof(*c));
	c->op = op;
	c->vector = -1;
	c->arg[0] = a0;
	c->arg[1] = a1;
	c->arg[2] = a2;
	c->arg[3] = a3;
	c->arg[4] = a4;
	return c;
}

const struct guest_exc *vcpu_exception(const struct vcpu *v, uint32_t i)
{
	return i < GUEST_MAX_EXC && i < v->area->nexc ? &v->area->exc[i] : NULL;
}

uint32_t vcpu_nexc(const struct vcpu *v)
{
	return v->area->nexc < GUEST_MAX_EXC ? v->area->nexc : GUEST_MAX_EXC;
}

static int fatal_exception(struct vcpu *v, uint32_t vector)
{
	const struct guest_exc *e = v->area->nexc ? vcpu_exception(v, v->area->nexc - 1) : NULL;

	if (e)
		return fail(v->vm, "guest vCPU %d: unexpected exception vector %u at rip %#llx "
			    "(error code %#llx)", v->id, e->vector, (unsigned long long)e->rip,
			    (unsigned long long)e->error_code);
	return fail(v->vm, "guest vCPU %d: fatal report %#x", v->id, vector);
}

int batch_run(struct vcpu *v, struct run_stats *stats)
{
	struct run_stats local = { 0 };
	struct kvm_run *run = v->run;

	if (!stats)
		stats = &local;
	if (v->area->ncmds > GUEST_MAX_CMDS)
		return fail(v->vm, "internal: batch of more than %d guest commands", GUEST_MAX_CMDS);
	if (epmu_run_start(v))
		return -1;

	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return fail(v->vm, "KVM_RUN: %s", strerror(errno));
		}
		stats->exits++;
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			const uint8_t *data = (const uint8_t *)run + run->io.data_offset;
			uint32_t val = 0;

			if (run->io.direction != KVM_EXIT_IO_OUT)
				return fail(v->vm, "guest read from port %#x", run->io.port);
			if (epmu_io_exit(v))
				return -1;
			memcpy(&val, data, run->io.size < 4 ? run->io.size : 4);
			switch (run->io.port) {
			case PORT_TICK:
				stats->ticks++;
				stats->tick_sum += val;
				continue;
			case PORT_DONE:
				v->booted = true;
				return 0;
			case PORT_FATAL:
				return fatal_exception(v, val);
			default:
				return fail(v->vm, "guest wrote to unexpected port %#x", run->io.port);
			}
		}
		case KVM_EXIT_INTR:
			continue;
		case KVM_EXIT_X86_RDMSR:
		case KVM_EXIT_X86_WRMSR:
		case KVM_EXIT_DEBUG: {
			/* Only the emulated PMU asks for these (MSR filter, guest debug). */
			int r = epmu_exit(v);

			if (r > 0)
				continue;
			if (r < 0)
				return -1;
			return fail(v->vm, "unexpected KVM exit reason %u", run->exit_reason);
		}
		case KVM_EXIT_HLT:
			return fail(v->vm, "guest vCPU %d halted", v->id);
		case KVM_EXIT_SHUTDOWN: {
			char last[VM_ERR_LEN] = "";

			if (v->area->nexc) {
				fatal_exception(v, 0);
				memcpy(last, v->vm->err, sizeof(last));
			}
			return fail(v->vm, "guest vCPU %d shut down (triple fault)%s%.400s", v->id,
				    last[0] ? "; last: " : "", last);
		}
		case KVM_EXIT_FAIL_ENTRY:
			return fail(v->vm, "VM entry failed: hardware reason %#llx",
				    (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
		case KVM_EXIT_INTERNAL_ERROR:
			return fail(v->vm, "KVM internal error, suberror %u", run->internal.suberror);
		case KVM_EXIT_MMIO:
			return fail(v->vm, "guest MMIO access at %#llx",
				    (unsigned long long)run->mmio.phys_addr);
		default:
			return fail(v->vm, "unexpected KVM exit reason %u", run->exit_reason);
		}
	}
}

int pin_to_cpu(int cpu)
{
	cpu_set_t set;

	if (cpu < 0 || cpu >= CPU_SETSIZE)
		return EINVAL;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set) < 0 ? errno : 0;
}
