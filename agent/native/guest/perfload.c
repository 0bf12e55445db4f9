/*
 * perfload: deterministic workloads measured with perf_event_open(2).
 *
 * The same static binary runs on the host (the bare-metal reference) and inside a guest booted by
 * agent/guestimage.py. It prints ONE JSON object on stdout and exits 0 whenever it could run;
 * 2 on a usage error. It never invents a count: an event that cannot be opened is reported with
 * its errno and a null count.
 *
 * Phases (--mode, separated by ',' or '+'; default count,sample,enum):
 *   count   user-only counting (exclude_kernel=1, exclude_hv=1) of instructions, branches and
 *           cycles over an asm loop of known length. Each run measures the loop with 0 iterations
 *           (the baseline: the fixed enable/disable path) and with N iterations, so
 *           counts - baseline = LOOP_INSNS * N instructions and N branches by construction.
 *   sample  instructions with sample_period=P over the same loop, overflow signals (O_ASYNC,
 *           F_SETSIG=SIGIO) counted by a handler and PERF_RECORD_SAMPLE records counted in the
 *           ring buffer; expected samples = floor(total_count / P).
 *   enum    the CPU's own CPUID PMU enumeration, the perf PMU in sysfs, and how many GP-only
 *           events (branches) one perf group can hold ("max_group").
 *   spin    run loop(N) once and measure nothing: the fixed workload an outside `perf stat` or
 *           `perf record` measures (3N instructions and N branches in the loop, plus this
 *           program's own start-up and output).
 *   include_guest  open instructions WITHOUT exclude_guest (and with, for contrast) and report the
 *           errno: EOPNOTSUPP on a mediated-vPMU host while a mediated VM lives (kernel/events/core.c
 *           mediated_pmu_account_event()).
 *
 * Dependencies: libc and the Linux UAPI headers only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PERFLOAD_VERSION 1
#define LOOP_INSNS 3    /* add, dec, jnz per iteration */
#define LOOP_BRANCHES 1 /* jnz per iteration */
#define MAX_GROUP 64
#define MAX_RUNS 32

/* ---------------------------------------------------------------------------------------------- */
/* The workload. test+jz execute exactly once whatever n is (jz is a branch taken or not), so
 * loop(n) - loop(0) retires exactly 3n instructions and n branches. */
static __attribute__((noinline)) uint64_t loop(uint64_t n)
{
	uint64_t acc = 0;
	__asm__ volatile("test %[n], %[n]\n\t"
			 "jz 2f\n"
			 "1:\n\t"
			 "add $1, %[acc]\n\t"
			 "dec %[n]\n\t"
			 "jnz 1b\n"
			 "2:\n"
			 : [n] "+r"(n), [acc] "+r"(acc)
			 :
			 : "cc");
	return acc;
}

/* ---------------------------------------------------------------------------------------------- */
/* JSON output */

static void json_str(const char *s)
{
	putchar('"');
	for (; s && *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c == '\n')
			fputs("\\n", stdout);
		else if (c == '\t')
			fputs("\\t", stdout);
		else if (c < 0x20 || c >= 0x7f)
			printf("\\u%04x", c);
		else
			putchar(c);
	}
	putchar('"');
}

static const char *errno_name(int e)
{
	switch (e) {
	case 0: return "OK";
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case ENODEV: return "ENODEV";
	case EINVAL: return "EINVAL";
	case EACCES: return "EACCES";
	case EBUSY: return "EBUSY";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case E2BIG: return "E2BIG";
	case ENOSPC: return "ENOSPC";
	case ENOSYS: return "ENOSYS";
	case EMFILE: return "EMFILE";
	case ENOMEM: return "ENOMEM";
	case EFAULT: return "EFAULT";
	default: return "E?";
	}
}

/* ---------------------------------------------------------------------------------------------- */
/* perf helpers */

struct event {
	const char *name;
	uint32_t type;
	uint64_t config;
};

static const struct event EVENTS[] = {
	{"instructions", PERF_TYPE_HARDWARE, PERF_COUNT_HW_INSTRUCTIONS},
	{"branches", PERF_TYPE_HARDWARE, PERF_COUNT_HW_BRANCH_INSTRUCTIONS},
	{"cycles", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES},
};
#define NEVENTS ((int)(sizeof(EVENTS) / sizeof(EVENTS[0])))

static int opt_exclude_guest = 1;

static long perf_open(struct perf_event_attr *attr, int group_fd)
{
	return syscall(SYS_perf_event_open, attr, 0 /* this task */, -1 /* any cpu */, group_fd,
		       PERF_FLAG_FD_CLOEXEC);
}

static void base_attr(struct perf_event_attr *a, const struct event *ev, int exclude_guest)
{
	memset(a, 0, sizeof(*a));
	a->size = sizeof(*a);
	a->type = ev->type;
	a->config = ev->config;
	a->disabled = 1;
	a->exclude_kernel = 1;
	a->exclude_hv = 1;
	a->exclude_guest = exclude_guest ? 1 : 0;
	a->read_format = PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING;
}

struct reading {
	uint64_t value, enabled, running;
};

static int read_event(int fd, struct reading *r)
{
	ssize_t n = read(fd, r, sizeof(*r));
	return n == (ssize_t)sizeof(*r) ? 0 : (n < 0 ? errno : EIO);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------------------------------------- */
/* count phase */

static void phase_count(uint64_t iters, int runs)
{
	int fd[NEVENTS], err[NEVENTS], rerr[NEVENTS];
	uint64_t base[NEVENTS][MAX_RUNS], cnt[NEVENTS][MAX_RUNS];
	int mux[NEVENTS];
	int any = 0;

	for (int i = 0; i < NEVENTS; i++) {
		struct perf_event_attr a;
		base_attr(&a, &EVENTS[i], opt_exclude_guest);
		fd[i] = (int)perf_open(&a, -1);
		err[i] = fd[i] < 0 ? errno : 0;
		rerr[i] = 0;
		mux[i] = 0;
		any |= fd[i] >= 0;
	}
	/* control: a software event needs no PMU; it shows perf_event_open itself works here */
	static const struct event task_clock = {"task_clock", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK};
	struct perf_event_attr sa;
	base_attr(&sa, &task_clock, 0);
	sa.exclude_kernel = 0;
	int swfd = (int)perf_open(&sa, -1), swerr = swfd < 0 ? errno : 0;
	uint64_t swcount = 0;
	any |= swfd >= 0;
	for (int r = 0; any && r < runs; r++) {
		for (int pass = 0; pass < 2; pass++) {
			uint64_t n = pass ? iters : 0;
			struct reading before[NEVENTS], after[NEVENTS];
			for (int i = 0; i < NEVENTS; i++) {
				if (fd[i] < 0)
					continue;
				ioctl(fd[i], PERF_EVENT_IOC_RESET, 0);
				if (read_event(fd[i], &before[i]))
					memset(&before[i], 0, sizeof(before[i]));
			}
			/* enables/disables every event of this task at once: the window is the same
			 * user-mode path for every event and every n */
			prctl(PR_TASK_PERF_EVENTS_ENABLE, 0, 0, 0, 0);
			loop(n);
			prctl(PR_TASK_PERF_EVENTS_DISABLE, 0, 0, 0, 0);
			for (int i = 0; i < NEVENTS; i++) {
				if (fd[i] < 0)
					continue;
				int e = read_event(fd[i], &after[i]);
				if (e) {
					rerr[i] = e;
					continue;
				}
				if (after[i].running - before[i].running != after[i].enabled - before[i].enabled)
					mux[i] = 1;
				(pass ? cnt : base)[i][r] = after[i].value;
			}
			struct reading sw;
			if (swfd >= 0 && pass && !read_event(swfd, &sw))
				swcount = sw.value; /* cumulative over every window: no RESET needed */
		}
	}

	printf("\"count\": {\"iterations\": %llu, \"runs\": %d, \"loop\": {\"instructions\": %llu, "
	       "\"branches\": %llu}, \"events\": {",
	       (unsigned long long)iters, runs, (unsigned long long)(iters * LOOP_INSNS),
	       (unsigned long long)(iters * LOOP_BRANCHES));
	for (int i = 0; i < NEVENTS; i++) {
		int e = err[i] ? err[i] : rerr[i];
		printf("%s\"%s\": {\"errno\": %d, \"error\": ", i ? ", " : "", EVENTS[i].name, e);
		if (e) {
			json_str(errno_name(e));
			printf(", \"op\": \"%s\", \"baseline\": null, \"counts\": null, \"multiplexed\": null}",
			       err[i] ? "perf_event_open" : "read");
			continue;
		}
		fputs("null, \"op\": null, \"baseline\": [", stdout);
		for (int r = 0; r < runs; r++)
			printf("%s%llu", r ? ", " : "", (unsigned long long)base[i][r]);
		fputs("], \"counts\": [", stdout);
		for (int r = 0; r < runs; r++)
			printf("%s%llu", r ? ", " : "", (unsigned long long)cnt[i][r]);
		printf("], \"multiplexed\": %s}", mux[i] ? "true" : "false");
	}
	printf("}, \"software\": {\"event\": \"task_clock\", \"errno\": %d, \"error\": ", swerr);
	if (swerr) {
		json_str(errno_name(swerr));
		fputs(", \"count\": null}}", stdout);
	} else {
		printf("null, \"count\": %llu}}", (unsigned long long)swcount);
	}
	for (int i = 0; i < NEVENTS; i++)
		if (fd[i] >= 0)
			close(fd[i]);
	if (swfd >= 0)
		close(swfd);
}

/* ---------------------------------------------------------------------------------------------- */
/* sample phase */

static volatile sig_atomic_t sigio_count, sigio_hup;

static void on_sigio(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	if (si && si->si_code == POLL_HUP)
		sigio_hup++;
	else
		sigio_count++;
}

struct ring_stats {
	uint64_t samples, lost, throttle, unthrottle, other, truncated;
};

static void ring_walk(void *base, size_t page, size_t data_size, struct ring_stats *st)
{
	struct perf_event_mmap_page *meta = base;
	uint64_t head = __atomic_load_n(&meta->data_head, __ATOMIC_ACQUIRE);
	uint64_t tail = meta->data_tail;
	size_t off = meta->data_offset ? meta->data_offset : page;
	unsigned char *data = (unsigned char *)base + off;
	if (head - tail > data_size) {
		st->truncated = 1; /* not consumed while running: should not happen, sized below */
		tail = head - data_size;
	}
	while (tail + sizeof(struct perf_event_header) <= head) {
		struct perf_event_header h;
		unsigned char *hp = (unsigned char *)&h;
		for (size_t i = 0; i < sizeof(h); i++)
			hp[i] = data[(tail + i) % data_size];
		if (h.size < sizeof(h))
			break;
		if (h.type == PERF_RECORD_SAMPLE) {
			st->samples++;
		} else if (h.type == PERF_RECORD_LOST) {
			uint64_t lost = 0;
			unsigned char *lp = (unsigned char *)&lost;
			for (size_t i = 0; i < 8; i++) /* struct { header; u64 id; u64 lost; } */
				lp[i] = data[(tail + sizeof(h) + 8 + i) % data_size];
			st->lost += lost;
		} else if (h.type == PERF_RECORD_THROTTLE) {
			st->throttle++;
		} else if (h.type == PERF_RECORD_UNTHROTTLE) {
			st->unthrottle++;
		} else {
			st->other++;
		}
		tail += h.size;
	}
	__atomic_store_n(&meta->data_tail, head, __ATOMIC_RELEASE);
}

static void phase_sample(uint64_t iters, uint64_t period)
{
	struct perf_event_attr a;
	base_attr(&a, &EVENTS[0], opt_exclude_guest);
	a.sample_period = period;
	a.sample_type = PERF_SAMPLE_IP;
	a.wakeup_events = 1;
	printf("\"sample\": {\"event\": \"instructions\", \"iterations\": %llu, \"period\": %llu, "
	       "\"loop_instructions\": %llu, ",
	       (unsigned long long)iters, (unsigned long long)period,
	       (unsigned long long)(iters * LOOP_INSNS));
	int fd = (int)perf_open(&a, -1);
	if (fd < 0) {
		int e = errno;
		printf("\"errno\": %d, \"error\": ", e);
		json_str(errno_name(e));
		fputs(", \"op\": \"perf_event_open\", \"samples\": null, \"signals\": null, \"lost\": null, "
		      "\"throttle\": null, \"count\": null, \"multiplexed\": null}", stdout);
		return;
	}
	/* ring buffer: 16-byte records (header + ip), room for every expected sample twice over */
	long page = sysconf(_SC_PAGESIZE);
	uint64_t want = (iters * LOOP_INSNS / period + 64) * 2 * 16;
	size_t pages = 1;
	while (pages * (size_t)page < want && pages < 4096)
		pages <<= 1;
	size_t len = (pages + 1) * (size_t)page;
	const char *op = NULL;
	int e = 0;
	void *ring = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (ring == MAP_FAILED) {
		e = errno;
		op = "mmap";
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigio;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (!e && sigaction(SIGIO, &sa, NULL)) {
		e = errno;
		op = "sigaction";
	}
	if (!e && (fcntl(fd, F_SETFL, O_ASYNC) || fcntl(fd, F_SETSIG, SIGIO) ||
		   fcntl(fd, F_SETOWN, getpid()))) {
		e = errno;
		op = "fcntl";
	}
	struct reading rd = {0, 0, 0};
	struct ring_stats st = {0, 0, 0, 0, 0, 0};
	uint64_t t0 = 0, t1 = 0;
	if (!e) {
		sigio_count = 0;
		sigio_hup = 0;
		ioctl(fd, PERF_EVENT_IOC_RESET, 0);
		t0 = now_ns();
		ioctl(fd, PERF_EVENT_IOC_ENABLE, 0);
		loop(iters);
		ioctl(fd, PERF_EVENT_IOC_DISABLE, 0);
		t1 = now_ns();
		e = read_event(fd, &rd);
		if (e)
			op = "read";
		else
			ring_walk(ring, (size_t)page, pages * (size_t)page, &st);
	}
	printf("\"errno\": %d, \"error\": ", e);
	if (e) {
		json_str(errno_name(e));
		printf(", \"op\": \"%s\", \"samples\": null, \"signals\": null, \"lost\": null, "
		       "\"throttle\": null, \"count\": null, \"multiplexed\": null}", op);
	} else {
		printf("null, \"op\": null, \"samples\": %llu, \"signals\": %d, \"signals_hup\": %d, "
		       "\"lost\": %llu, \"throttle\": %llu, \"unthrottle\": %llu, \"other_records\": %llu, "
		       "\"ring_truncated\": %s, \"count\": %llu, \"multiplexed\": %s, \"wall_ns\": %llu}",
		       (unsigned long long)st.samples, (int)sigio_count, (int)sigio_hup,
		       (unsigned long long)st.lost, (unsigned long long)st.throttle,
		       (unsigned long long)st.unthrottle, (unsigned long long)st.other,
		       st.truncated ? "true" : "false", (unsigned long long)rd.value,
		       rd.running != rd.enabled ? "true" : "false", (unsigned long long)(t1 - t0));
	}
	signal(SIGIO, SIG_IGN);
	if (ring != MAP_FAILED)
		munmap(ring, len);
	close(fd);
}

/* ---------------------------------------------------------------------------------------------- */
/* enum phase */

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void print_sig(const uint32_t *regs, int n)
{
	char s[17];
	memcpy(s, regs, (size_t)n * 4);
	s[n * 4] = 0;
	for (int i = 0; i < n * 4; i++)
		if (s[i] && (s[i] < 0x20 || s[i] >= 0x7f))
			s[i] = '?';
	json_str(s);
}

static void print_cpuid(void)
{
	uint32_t r[4], v[3], max, ext;
	cpuid(0, 0, r);
	max = r[0];
	v[0] = r[1];
	v[1] = r[3];
	v[2] = r[2];
	fputs("\"cpuid\": {\"vendor_id\": ", stdout);
	print_sig(v, 3);
	cpuid(1, 0, r);
	uint32_t fam = (r[0] >> 8) & 0xf, model = (r[0] >> 4) & 0xf;
	if (fam == 0xf)
		fam += (r[0] >> 20) & 0xff;
	if (fam >= 6)
		model |= ((r[0] >> 16) & 0xf) << 4;
	int hyper = (r[2] >> 31) & 1, pdcm = (r[2] >> 15) & 1;
	printf(", \"max_leaf\": %u, \"family\": %u, \"model\": %u, \"stepping\": %u, \"hypervisor\": %s, "
	       "\"pdcm\": %s, \"hypervisor_id\": ",
	       max, fam, model, r[0] & 0xf, hyper ? "true" : "false", pdcm ? "true" : "false");
	if (hyper) {
		cpuid(0x40000000, 0, r);
		print_sig(&r[1], 3);
	} else {
		fputs("null", stdout);
	}
	int version = 0, gp = 0, gpw = 0, fixed = 0, fixedw = 0;
	uint32_t unavail = 0, masklen = 0, fixed_mask = 0;
	if (max >= 0xa) {
		cpuid(0xa, 0, r);
		version = r[0] & 0xff;
		gp = (r[0] >> 8) & 0xff;
		gpw = (r[0] >> 16) & 0xff;
		masklen = r[0] >> 24;
		unavail = r[1];
		fixed_mask = r[2];
		if (version > 1) {
			fixed = r[3] & 0x1f;
			fixedw = (r[3] >> 5) & 0xff;
		}
	}
	uint32_t avail = masklen ? (~unavail) & (masklen >= 32 ? 0xffffffffu : ((1u << masklen) - 1)) : 0;
	printf(", \"leaf_0xa\": {\"version\": %d, \"gp_counters\": %d, \"gp_width\": %d, "
	       "\"arch_events_mask\": %u, \"fixed_counters\": %d, \"fixed_width\": %d, "
	       "\"fixed_counters_mask\": %u}",
	       version, gp, gpw, avail, fixed, fixedw, fixed_mask);
	cpuid(0x80000000, 0, r);
	ext = r[0];
	int perfctr_core = 0, perfmon_v2 = 0, amd_core = 0;
	if (ext >= 0x80000001 && ext < 0x8000ffff) {
		cpuid(0x80000001, 0, r);
		perfctr_core = (r[2] >> 23) & 1;
	}
	if (ext >= 0x80000022 && ext < 0x8000ffff) {
		cpuid(0x80000022, 0, r);
		perfmon_v2 = r[0] & 1;
		amd_core = r[1] & 0xf;
	}
	printf(", \"max_ext_leaf\": %u, \"perfctr_core\": %s, \"perfmon_v2\": %s, \"amd_core_counters\": %d",
	       ext, perfctr_core ? "true" : "false", perfmon_v2 ? "true" : "false", amd_core);
	/* GP counters as the CPU enumerates them: Intel leaf 0xA; AMD PerfMonV2 leaf 0x80000022,
	 * else 6 with PerfCtrExtCore, else the 4 legacy K7 counters (implied, not enumerated) */
	int is_amd = !memcmp(v, "AuthenticAMD", 12) || !memcmp(v, "HygonGenuine", 12);
	int gp_enum = gp;
	const char *src = "cpuid_0xa";
	if (is_amd) {
		if (perfmon_v2) {
			gp_enum = amd_core;
			src = "cpuid_0x80000022";
		} else if (perfctr_core) {
			gp_enum = 6;
			src = "perfctr_core";
		} else {
			gp_enum = 4;
			src = "amd_legacy_implied";
		}
	}
	printf(", \"gp_counters\": %d, \"gp_counters_source\": \"%s\"}", gp_enum, src);
}

static int read_small(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		n--;
	buf[n] = 0;
	return 0;
}

static void print_sysfs_pmu(void)
{
	static const char *caps[] = {"max_precise", "branches", "pmu_name", "num_counters"};
	char buf[256], path[256];
	int present = access("/sys/bus/event_source/devices/cpu", F_OK) == 0;
	printf("\"sysfs_pmu\": {\"cpu_present\": %s, \"type\": ", present ? "true" : "false");
	if (present && !read_small("/sys/bus/event_source/devices/cpu/type", buf, sizeof(buf)))
		fputs(buf, stdout);
	else
		fputs("null", stdout);
	fputs(", \"caps\": {", stdout);
	int first = 1;
	for (size_t i = 0; present && i < sizeof(caps) / sizeof(caps[0]); i++) {
		snprintf(path, sizeof(path), "/sys/bus/event_source/devices/cpu/caps/%s", caps[i]);
		if (read_small(path, buf, sizeof(buf)))
			continue;
		printf("%s\"%s\": ", first ? "" : ", ", caps[i]);
		json_str(buf);
		first = 0;
	}
	fputs("}}", stdout);
}

/* How many GP-only events one group can hold: branches have no fixed counter on Intel and every
 * AMD event is GP. Opening member k+1 fails (EINVAL from x86 validate_group) or the group is
 * never scheduled (time_running 0) once k exceeds what perf can use. */
static void print_max_group(void)
{
	int fds[MAX_GROUP];
	int max = 0, stop_errno = 0;
	const char *stop = "limit";
	for (int k = 1; k <= MAX_GROUP; k++) {
		int n = 0, e = 0;
		for (; n < k; n++) {
			struct perf_event_attr a;
			base_attr(&a, &EVENTS[1], opt_exclude_guest);
			a.disabled = n == 0;
			a.read_format = PERF_FORMAT_GROUP | PERF_FORMAT_TOTAL_TIME_ENABLED |
					PERF_FORMAT_TOTAL_TIME_RUNNING;
			fds[n] = (int)perf_open(&a, n ? fds[0] : -1);
			if (fds[n] < 0) {
				e = errno;
				break;
			}
		}
		int scheduled = 0;
		if (!e) {
			uint64_t buf[3 + MAX_GROUP];
			ioctl(fds[0], PERF_EVENT_IOC_ENABLE, PERF_IOC_FLAG_GROUP);
			loop(1000);
			ioctl(fds[0], PERF_EVENT_IOC_DISABLE, PERF_IOC_FLAG_GROUP);
			ssize_t got = read(fds[0], buf, sizeof(buf));
			scheduled = got >= 24 && buf[2] > 0; /* nr, time_enabled, time_running, values */
			if (got < 0)
				e = errno;
		}
		for (int i = 0; i < n; i++)
			close(fds[i]);
		if (e || !scheduled) {
			stop_errno = e;
			stop = e ? (k == 1 || n < k ? "perf_event_open" : "read") : "not_scheduled";
			break;
		}
		max = k;
	}
	printf("\"group\": {\"event\": \"branches\", \"max_group\": %d, \"stopped_by\": \"%s\", "
	       "\"stop_errno\": %d, \"stop_error\": ", max, stop, stop_errno);
	json_str(errno_name(stop_errno));
	putchar('}');
}

static void print_kernel_log(void)
{
	int len = klogctl(10 /* SYSLOG_ACTION_SIZE_BUFFER */, NULL, 0);
	fputs("\"kernel_pmu_log\": ", stdout);
	if (len <= 0) {
		fputs("null", stdout);
		return;
	}
	char *buf = malloc((size_t)len + 1);
	int n = buf ? klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf, len) : -1;
	if (n < 0) {
		fputs("null", stdout);
		free(buf);
		return;
	}
	buf[n] = 0;
	putchar('[');
	int first = 1, shown = 0;
	for (char *line = strtok(buf, "\n"); line && shown < 16; line = strtok(NULL, "\n")) {
		if (!strstr(line, "Performance Events") && !strstr(line, "PMU") && !strstr(line, "perf:") &&
		    !strstr(line, "software events"))
			continue;
		if (!first)
			fputs(", ", stdout);
		json_str(line);
		first = 0;
		shown++;
	}
	putchar(']');
	free(buf);
}

static void phase_enum(void)
{
	fputs("\"enum\": {", stdout);
	print_cpuid();
	fputs(", ", stdout);
	print_sysfs_pmu();
	fputs(", ", stdout);
	print_max_group();
	fputs(", ", stdout);
	print_kernel_log();
	putchar('}');
}

/* ---------------------------------------------------------------------------------------------- */
/* include_guest phase */

static void phase_include_guest(void)
{
	fputs("\"include_guest\": {\"event\": \"instructions\"", stdout);
	for (int eg = 0; eg < 2; eg++) {
		struct perf_event_attr a;
		base_attr(&a, &EVENTS[0], eg);
		int fd = (int)perf_open(&a, -1);
		int e = fd < 0 ? errno : 0;
		if (fd >= 0)
			close(fd);
		printf(", \"%s\": {\"errno\": %d, \"error\": ", eg ? "with_exclude_guest" : "without_exclude_guest", e);
		json_str(errno_name(e));
		putchar('}');
	}
	putchar('}');
}

/* ---------------------------------------------------------------------------------------------- */

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s [--mode count,sample,enum,spin,include_guest] [--iterations N] [--runs R]\n"
		"          [--sample-iterations N] [--period P] [--exclude-guest 0|1] [--where LABEL]\n",
		argv0);
	exit(2);
}

static uint64_t parse_u64(const char *s, const char *argv0)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || !*s || *end)
		usage(argv0);
	return v;
}

int main(int argc, char **argv)
{
	const char *mode = "count,sample,enum", *where = "unknown";
	uint64_t iters = 1000000, sample_iters = 50000000, period = 1000000, runs = 5;
	for (int i = 1; i < argc; i++) {
		const char *arg = argv[i], *val = NULL;
		char key[64];
		const char *eq = strchr(arg, '=');
		if (eq && (size_t)(eq - arg) < sizeof(key)) {
			memcpy(key, arg, (size_t)(eq - arg));
			key[eq - arg] = 0;
			val = eq + 1;
			arg = key;
		} else if (i + 1 < argc) {
			val = argv[i + 1];
			i++;
		}
		if (!val)
			usage(argv[0]);
		if (!strcmp(arg, "--mode"))
			mode = val;
		else if (!strcmp(arg, "--iterations"))
			iters = parse_u64(val, argv[0]);
		else if (!strcmp(arg, "--sample-iterations"))
			sample_iters = parse_u64(val, argv[0]);
		else if (!strcmp(arg, "--period"))
			period = parse_u64(val, argv[0]);
		else if (!strcmp(arg, "--runs"))
			runs = parse_u64(val, argv[0]);
		else if (!strcmp(arg, "--exclude-guest"))
			opt_exclude_guest = (int)parse_u64(val, argv[0]);
		else if (!strcmp(arg, "--where"))
			where = val;
		else
			usage(argv[0]);
	}
	if (runs < 1 || runs > MAX_RUNS || period < 1 || iters > (1ull << 40) || sample_iters > (1ull << 40) ||
	    sample_iters * LOOP_INSNS / period > 1000000)
		usage(argv[0]);

	uint64_t t0 = now_ns();
	char buf[64];
	printf("{\"tool\": \"perfload\", \"version\": %d, \"where\": ", PERFLOAD_VERSION);
	json_str(where);
	printf(", \"pid\": %d, \"exclude_guest\": %d, \"insns_per_iteration\": %d, \"branches_per_iteration\": %d",
	       (int)getpid(), opt_exclude_guest, LOOP_INSNS, LOOP_BRANCHES);
	printf(", \"perf_event_paranoid\": %s",
	       read_small("/proc/sys/kernel/perf_event_paranoid", buf, sizeof(buf)) ? "null" : buf);
	printf(", \"nmi_watchdog\": %s", read_small("/proc/sys/kernel/nmi_watchdog", buf, sizeof(buf)) ? "null" : buf);
	fputs(", \"kernel_release\": ", stdout);
	if (read_small("/proc/sys/kernel/osrelease", buf, sizeof(buf)))
		fputs("null", stdout);
	else
		json_str(buf);
	char modes[128];
	snprintf(modes, sizeof(modes), ",%s,", mode);
	for (char *c = modes; *c; c++)
		if (*c == '+') /* the guest's kernel command line carries "count+sample" */
			*c = ',';
	if (strstr(modes, ",count,")) {
		fputs(", ", stdout);
		phase_count(iters, (int)runs);
	}
	if (strstr(modes, ",sample,")) {
		fputs(", ", stdout);
		phase_sample(sample_iters, period);
	}
	if (strstr(modes, ",enum,")) {
		fputs(", ", stdout);
		phase_enum();
	}
	if (strstr(modes, ",spin,")) {
		uint64_t s0 = now_ns(), acc = loop(iters);
		printf(", \"spin\": {\"iterations\": %llu, \"loop_instructions\": %llu, \"loop_branches\": %llu, "
		       "\"acc\": %llu, \"ns\": %llu}",
		       (unsigned long long)iters, (unsigned long long)(iters * LOOP_INSNS),
		       (unsigned long long)(iters * LOOP_BRANCHES), (unsigned long long)acc,
		       (unsigned long long)(now_ns() - s0));
	}
	if (strstr(modes, ",include_guest,")) {
		fputs(", ", stdout);
		phase_include_guest();
	}
	printf(", \"elapsed_ns\": %llu}\n", (unsigned long long)(now_ns() - t0));
	fflush(stdout);
	return 0;
}
