// SPDX-License-Identifier: GPL-2.0
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "caps.h"
#include "epmu.h"
#include "verdict_rules.h"
#include "vm.h"

/* One rule of agent/facts/rules.py fired: VR_<ID> is its template, VR_<ID>_BLOCKS its kind. */
#define RULE(c, id, ...) rule_add((c), id##_BLOCKS, id, ##__VA_ARGS__)

__attribute__((format(printf, 3, 4)))
static void rule_add(struct host_caps *c, int blocks, const char *fmt, ...)
{
	int *n = blocks ? &c->nreasons : &c->ncaveats;
	char (*list)[CAPS_REASON_LEN] = blocks ? c->reasons : c->caveats;
	va_list ap;

	if (*n >= CAPS_MAX_REASONS)
		return;
	va_start(ap, fmt);
	vsnprintf(list[(*n)++], CAPS_REASON_LEN, fmt, ap);
	va_end(ap);
}

/* A /sys or /proc path, below $PMUFARM_SYSROOT when set (tests craft such trees). */
static void sys_path(char *out, size_t len, const char *fmt, ...)
{
	const char *root = getenv("PMUFARM_SYSROOT");
	size_t used = (size_t)snprintf(out, len, "%s", root ? root : "");
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(out + (used < len ? used : len), used < len ? len - used : 0, fmt, ap);
	va_end(ap);
}

static int read_int_file(const char *path, int *out)
{
	FILE *f = fopen(path, "re");
	int ok;

	if (!f)
		return -1;
	ok = fscanf(f, "%d", out) == 1;
	fclose(f);
	return ok ? 0 : -1;
}

/* A module parameter: 1 for Y/1, 0 for N/0, -1 if absent or unreadable. */
static int read_bool_param(const char *module, const char *param)
{
	char path[512], buf[16] = "";
	FILE *f;

	sys_path(path, sizeof(path), "/sys/module/%s/parameters/%s", module, param);
	f = fopen(path, "re");
	if (!f)
		return -1;
	if (!fgets(buf, sizeof(buf), f))
		buf[0] = '\0';
	fclose(f);
	if (buf[0] == 'Y' || buf[0] == 'y' || buf[0] == '1')
		return 1;
	if (buf[0] == 'N' || buf[0] == 'n' || buf[0] == '0')
		return 0;
	return -1;
}

static bool module_loaded(const char *module)
{
	char path[512];

	sys_path(path, sizeof(path), "/sys/module/%s", module);
	return access(path, F_OK) == 0;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* "kvm_amd, kvm_pvm": the loaded KVM vendor modules (kvm_*), sorted like the Python facts. */
static void list_kvm_modules(char *out, size_t len)
{
	char path[512], *names[32];
	struct dirent *e;
	size_t used = 0;
	int n = 0;
	DIR *d;

	out[0] = '\0';
	sys_path(path, sizeof(path), "/sys/module");
	d = opendir(path);
	if (!d)
		return;
	while ((e = readdir(d)) && n < 32)
		if (!strncmp(e->d_name, "kvm_", 4))
			names[n++] = strdup(e->d_name);
	closedir(d);
	qsort(names, (size_t)n, sizeof(names[0]), cmp_str);
	for (int i = 0; i < n; i++) {
		if (names[i] && used < len)
			used += (size_t)snprintf(out + used, len - used, "%s%s", used ? ", " : "", names[i]);
		free(names[i]);
	}
}

/* A VM with an in-kernel irqchip and one vCPU, as every probe makes: 0 or KVM_CREATE_VCPU's errno
 * (EBUSY while a host perf event without exclude_guest exists: x86.c kvm_arch_vcpu_precreate()
 * -> perf_create_mediated_pmu()); -1 when the VM or irqchip cannot be made. */
static int trial_vcpu_errno(int kvm_fd)
{
	int vm = ioctl(kvm_fd, KVM_CREATE_VM, 0), vcpu, ret = -1;

	if (vm < 0)
		return -1;
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) == 0) {
		vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
		ret = vcpu < 0 ? errno : 0;
		if (vcpu >= 0)
			close(vcpu);
	}
	close(vm);
	return ret;
}

static int64_t read_perf_capabilities(void)
{
	uint64_t v;
	int fd = open("/dev/cpu/0/msr", O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = pread(fd, &v, sizeof(v), MSR_IA32_PERF_CAPABILITIES);
	close(fd);
	return n == (ssize_t)sizeof(v) ? (int64_t)(v & INT64_MAX) : -1;
}

/* agent/facts/rules.py, in table order (agent/facts/verdict.py evaluates the same). */
static void verdict(struct host_caps *c)
{
	const struct pmu_layout *l = c->layout;
	const struct pmu_info *h = &c->host_pmu, *k = &c->kvm_pmu;
	bool mediated_y = c->vendor_module_loaded && c->enable_mediated_pmu == 1;

	if (!c->dev_kvm)
		RULE(c, VR_NO_DEV_KVM);
	if (!l) {
		RULE(c, VR_UNKNOWN_VENDOR, c->vendor_id);
		return;
	}
	if (c->dev_kvm) {
		if (c->enable_pmu < 0)
			RULE(c, VR_ENABLE_PMU_UNKNOWN);
		else if (c->enable_pmu == 0)
			RULE(c, VR_ENABLE_PMU_OFF);
		if (!c->vendor_module_loaded)
			RULE(c, VR_NO_VENDOR_MODULE, l->kvm_module, c->kvm_modules[0] ? c->kvm_modules : "none");
		else if (c->enable_mediated_pmu < 0)
			RULE(c, VR_MEDIATED_PARAM_ABSENT, l->kvm_module, c->release,
			     VR_FIRST_MEDIATED_RELEASE);
		else if (c->enable_mediated_pmu == 0)
			RULE(c, VR_MEDIATED_PARAM_OFF, l->kvm_module);
	}

	if (l == &intel_layout) {
		if (h->version < 4)
			RULE(c, VR_INTEL_VERSION_LOW, h->version);
		/* Finding 8: with enable_mediated_pmu=Y KVM has checked FW_WRITES itself. */
		if (!h->pdcm)
			RULE(c, VR_INTEL_NO_PDCM);
		else if (c->perf_capabilities < 0 && !(c->dev_kvm && mediated_y))
			RULE(c, VR_INTEL_FW_UNKNOWN, "unreadable");
		else if (c->perf_capabilities >= 0 && !(c->perf_capabilities & PERF_CAP_FW_WRITES))
			RULE(c, VR_INTEL_FW_CLEAR);
		if (h->hybrid)
			RULE(c, VR_INTEL_HYBRID);
	} else if (!h->perfmon_v2) {
		RULE(c, VR_AMD_NO_V2);
	}

	if (!c->dev_kvm)
		return;
	if (l == &intel_layout && k->version == 0)
		RULE(c, VR_INTEL_KVM_NO_PMU);
	else if (l != &intel_layout && !k->perfmon_v2)
		RULE(c, VR_AMD_KVM_NO_V2);
	if (c->nmi_watchdog > 0)
		RULE(c, VR_NMI_WATCHDOG, c->nmi_watchdog);
	if (c->vcpu_errno == EBUSY)
		RULE(c, VR_VCPU_BUSY);
	else if (c->vcpu_errno > 0)
		RULE(c, VR_VCPU_FAILED, c->vcpu_errno, strerror(c->vcpu_errno));
	if (c->ignore_msrs == 1)
		RULE(c, VR_IGNORE_MSRS);
}

void caps_collect(struct host_caps *c)
{
	uint32_t r[4] = { 0 };
	struct utsname u;
	char path[512];
	int kvm_fd;

	memset(c, 0, sizeof(*c));
	c->perf_capabilities = -1;
	c->vcpu_errno = -1;
	snprintf(c->release, sizeof(c->release), "%s", uname(&u) == 0 ? u.release : "unknown");
	sys_path(path, sizeof(path), "/proc/sys/kernel/nmi_watchdog");
	if (read_int_file(path, &c->nmi_watchdog))
		c->nmi_watchdog = -1;
	c->ignore_msrs = read_bool_param("kvm", "ignore_msrs");
	c->cap_pmu_capability = c->cap_pmu_event_filter = c->cap_irqchip = -1;

	cpuid_vendor(&host_cpuid_view, c->vendor_id);
	c->layout = pmu_layout_for(c->vendor_id);
	host_cpuid_view.get(&host_cpuid_view, 1, 0, r);
	c->family = (int)((r[0] >> 8) & 0xf);
	c->model = (int)((r[0] >> 4) & 0xf);
	if (c->family == 0xf)
		c->family += (int)((r[0] >> 20) & 0xff);
	if (c->family >= 6)
		c->model |= (int)((r[0] >> 16) & 0xf) << 4;
	c->stepping = (int)(r[0] & 0xf);
	c->hypervisor = r[2] >> 31 & 1;
	if (c->layout) {
		c->layout->decode(&host_cpuid_view, &c->host_pmu);
		if (c->host_pmu.pdcm)
			c->perf_capabilities = read_perf_capabilities();
	}

	c->enable_pmu = read_bool_param("kvm", "enable_pmu");
	list_kvm_modules(c->kvm_modules, sizeof(c->kvm_modules));
	c->enable_mediated_pmu = -1;
	if (c->layout) {
		c->vendor_module_loaded = module_loaded(c->layout->kvm_module);
		c->enable_mediated_pmu = read_bool_param(c->layout->kvm_module, "enable_mediated_pmu");
	}

	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0) {
		c->dev_kvm_errno = errno;
	} else {
		c->dev_kvm = true;
		c->cap_pmu_capability = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_PMU_CAPABILITY);
		c->cap_pmu_event_filter = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_PMU_EVENT_FILTER);
		c->cap_irqchip = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IRQCHIP);
		{
			char err[128];   /* no table: kvm_pmu stays zero and the verdict says so */

			c->kvm_cpuid = kvm_supported_cpuid(kvm_fd, err, sizeof(err));
		}
		if (c->vendor_module_loaded && c->enable_mediated_pmu == 1)
			c->vcpu_errno = trial_vcpu_errno(kvm_fd);
		close(kvm_fd);
		if (c->kvm_cpuid && c->layout) {
			struct cpuid_view kv = kvm_cpuid_view(c->kvm_cpuid);

			c->layout->decode(&kv, &c->kvm_pmu);
		}
	}
	epmu_caps(c);   /* an emulated PMU (lib/epmu.c) plays the host: its facts replace these */
	verdict(c);
}

void caps_free(struct host_caps *c)
{
	free(c->kvm_cpuid);
	c->kvm_cpuid = NULL;
}

void caps_reason(const struct host_caps *c, char *out, size_t len)
{
	size_t used = 0;

	out[0] = '\0';
	for (int i = 0; i < c->nreasons && used < len; i++)
		used += (size_t)snprintf(out + used, len - used, "%s%s", i ? "; " : "", c->reasons[i]);
}

static void json_tristate(struct json *j, const char *key, int v)
{
	if (v < 0)
		json_null(j, key);
	else
		json_bool(j, key, v);
}

void pmu_info_json(const struct pmu_layout *l, const struct pmu_info *p, struct json *j,
		   const char *key)
{
	json_obj_begin(j, key);
	json_i64(j, "version", p->version);
	json_i64(j, "gp_counters", p->gp);
	json_i64(j, "gp_width", p->gp_width);
	json_i64(j, "fixed_counters", __builtin_popcount(p->fixed_mask));
	json_i64(j, "fixed_width", p->fixed_width);
	json_u64(j, "fixed_counters_mask", p->fixed_mask);
	json_arr_begin(j, "arch_events");
	for (size_t i = 0; l && i < l->nevents; i++)
		if (p->events_mask >> i & 1)
			json_str(j, NULL, l->events[i].name);
	json_arr_end(j);
	json_u64(j, "arch_events_mask", p->events_mask);
	json_bool(j, "pdcm", p->pdcm);
	json_bool(j, "hybrid", p->hybrid);
	json_bool(j, "perfctr_core", p->perfctr_core);
	json_bool(j, "perfmon_v2", p->perfmon_v2);
	json_i64(j, "amd_core_counters", p->amd_core_counters);
	json_obj_end(j);
}

/* Boot a one-vCPU VM and take a #GP on RDPMC: proves the VMM and the guest IDT work here. */
static void vm_selfcheck(struct json *j)
{
	struct vm vm;
	struct vm_opts o = { .irqchip = true };
	struct vcpu *v = NULL;
	struct guest_cmd *rdpmc, *fast;
	int ok;

	json_obj_begin(j, "vm");
	ok = vm_create(&vm, &o) == 0 && vcpu_add(&vm, 0, &v) == 0;
	if (ok) {
		batch_begin(v);
		rdpmc = g_rdpmc(v, 0);
		fast = g_rdpmc(v, RDPMC_FAST);
		ok = batch_run(v, NULL) == 0;
	}
	json_bool(j, "runs", ok);
	if (ok) {
		json_null(j, "error");
		json_str(j, "irqchip", irqchip_name(vm.irqchip));
		json_bool(j, "guest_idt", true);
		json_opt_i64(j, "rdpmc_vector", rdpmc->vector);
		json_opt_i64(j, "fast_rdpmc_vector", fast->vector);
	} else {
		json_str(j, "error", vm.err);
	}
	json_obj_end(j);
	vm_destroy(&vm);
}

void caps_json(struct host_caps *c, struct json *j)
{
	json_obj_begin(j, NULL);
	json_str(j, "vendor", c->layout ? c->layout->vendor : "unknown");
	json_str(j, "vendor_id", c->vendor_id);
	json_i64(j, "family", c->family);
	json_i64(j, "model", c->model);
	json_i64(j, "stepping", c->stepping);
	json_bool(j, "hypervisor", c->hypervisor);
	pmu_info_json(c->layout, &c->host_pmu, j, "host_pmu");
	json_opt_i64(j, "perf_capabilities", c->perf_capabilities);
	json_obj_begin(j, "kernel");
	json_str(j, "release", c->release);
	json_opt_i64(j, "nmi_watchdog", c->nmi_watchdog);
	json_obj_end(j);
	json_obj_begin(j, "kvm");
	json_bool(j, "dev_kvm", c->dev_kvm);
	if (c->dev_kvm)
		json_null(j, "dev_kvm_error");
	else
		json_str(j, "dev_kvm_error", strerror(c->dev_kvm_errno));
	json_str(j, "modules", c->kvm_modules);
	json_str(j, "vendor_module", c->layout ? c->layout->kvm_module : "");
	json_bool(j, "vendor_module_loaded", c->vendor_module_loaded);
	json_tristate(j, "enable_pmu", c->enable_pmu);
	json_tristate(j, "enable_mediated_pmu", c->enable_mediated_pmu);
	json_tristate(j, "ignore_msrs", c->ignore_msrs);
	json_opt_i64(j, "mediated_vcpu_errno", c->vcpu_errno);
	json_opt_i64(j, "cap_pmu_capability", c->cap_pmu_capability);
	json_opt_i64(j, "cap_pmu_event_filter", c->cap_pmu_event_filter);
	json_opt_i64(j, "cap_irqchip", c->cap_irqchip);
	pmu_info_json(c->layout, &c->kvm_pmu, j, "supported_pmu");
	json_obj_end(j);
	json_obj_begin(j, "mediated_pmu");
	json_str(j, "status", c->nreasons ? "unavailable" : "available");
	json_arr_begin(j, "reasons");
	for (int i = 0; i < c->nreasons; i++)
		json_str(j, NULL, c->reasons[i]);
	json_arr_end(j);
	json_arr_begin(j, "caveats");
	for (int i = 0; i < c->ncaveats; i++)
		json_str(j, NULL, c->caveats[i]);
	json_arr_end(j);
	json_obj_end(j);
	if (c->dev_kvm)
		vm_selfcheck(j);
	json_obj_end(j);
}
