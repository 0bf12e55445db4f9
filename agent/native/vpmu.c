// SPDX-License-Identifier: GPL-2.0
/*
 * vpmu: the pmufarm native harness.
 *   vpmu caps                 one JSON object of host capabilities
 *   vpmu list                 {"probes": [...]}
 *   vpmu run PROBE [k=v ...]  {"probe","status","reason","observations","elapsed_ns"}
 *   vpmu --pmu emulated[:LAYOUT] caps|run ...   the same against the emulated PMU (include/epmu.h)
 * Exit status: 0 ok, 4 unsupported, 1 error.
 * Environment: PMUFARM_CPU=N pins like cpu=N; PMUFARM_VPMU_FORCE=1 runs PMU probes even when the
 * facts say the mediated vPMU is unusable (harness development only; the reason says so).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caps.h"
#include "epmu.h"
#include "json.h"
#include "probes.h"

#define EXIT_OK 0
#define EXIT_ERROR 1
#define EXIT_UNSUPPORTED 4

static const char *const status_names[] = { "ok", "unsupported", "error" };
static const int status_exit[] = { EXIT_OK, EXIT_UNSUPPORTED, EXIT_ERROR };

static void usage(FILE *f)
{
	fprintf(f, "usage: vpmu [--pmu real|emulated[:LAYOUT]] caps | list | run PROBE [k=v ...]\n"
		"  emulated layouts: %s (default: this CPU's vendor)\n", epmu_layout_names());
}

static int print_json(struct json *j)
{
	if (j->failed || !j->buf) {
		fprintf(stderr, "vpmu: out of memory building JSON\n");
		return -1;
	}
	fputs(j->buf, stdout);
	fputc('\n', stdout);
	return fflush(stdout) ? -1 : 0;
}

static int cmd_list(void)
{
	struct json j;
	int ret;

	json_init(&j);
	json_obj_begin(&j, NULL);
	json_arr_begin(&j, "probes");
	for (int i = 0; i < probe_count; i++)
		json_str(&j, NULL, probe_table[i].name);
	json_arr_end(&j);
	json_obj_end(&j);
	ret = print_json(&j);
	json_free(&j);
	return ret ? EXIT_ERROR : EXIT_OK;
}

static int cmd_caps(void)
{
	struct host_caps caps;
	struct json j;
	int ret;

	caps_collect(&caps);
	json_init(&j);
	caps_json(&caps, &j);
	ret = print_json(&j);
	json_free(&j);
	caps_free(&caps);
	return ret ? EXIT_ERROR : EXIT_OK;
}

static int emit(const char *name, enum probe_status st, const char *reason, const struct json *obs,
		uint64_t elapsed)
{
	struct json j;
	int ret;

	json_init(&j);
	json_obj_begin(&j, NULL);
	json_str(&j, "probe", name);
	json_str(&j, "status", status_names[st]);
	json_str(&j, "reason", reason);
	json_value(&j, "observations", obs);
	json_u64(&j, "elapsed_ns", elapsed);
	json_obj_end(&j);
	ret = print_json(&j);
	json_free(&j);
	return ret ? EXIT_ERROR : status_exit[st];
}

/* PMUFARM_VPMU_FORCE on a PMU-less host: a Zen 4+/Sapphire-Rapids-like guest PMU shape. */
static void assume_pmu(struct probe_ctx *c)
{
	struct pmu_info *p = &c->pmu;

	memset(p, 0, sizeof(*p));
	p->gp = c->l->max_gp == 6 ? 6 : 8;
	p->gp_width = 48;
	p->events_mask = (1u << c->l->nevents) - 1;
	p->has_global = p->has_status_set = true;
	if (c->l->fixed_base) {
		p->version = 5;
		p->fixed_mask = 0x7;
		p->fixed = 3;
		p->fixed_width = 48;
		p->pdcm = true;
	} else {
		p->version = 2;
		p->perfmon_v2 = p->perfctr_core = true;
		p->amd_core_counters = p->gp;
	}
}

static int cmd_run(int argc, char **argv)
{
	struct probe_ctx c;
	struct host_caps caps;
	struct json obs;
	enum probe_status st;
	const char *env;
	uint64_t t0 = now_ns();
	int ret;

	memset(&c, 0, sizeof(c));
	json_init(&obs);
	c.probe = probe_find(argv[0]);
	if (!c.probe) {
		char known[1024];
		size_t used = 0;

		known[0] = '\0';
		for (int i = 0; i < probe_count && used < sizeof(known); i++)
			used += (size_t)snprintf(known + used, sizeof(known) - used, "%s%s",
						 i ? ", " : "", probe_table[i].name);
		snprintf(c.reason, sizeof(c.reason), "unknown probe '%.64s' (known: %.900s)", argv[0], known);
		return emit(argv[0], PROBE_ERROR, c.reason, &obs, now_ns() - t0);
	}
	if (probe_parse_args(&c, argc - 1, argv + 1))
		return emit(c.probe->name, PROBE_ERROR, c.reason, &obs, now_ns() - t0);

	env = getenv("PMUFARM_CPU");
	if (c.cpu < 0 && env && *env) {
		char *end;
		long cpu = strtol(env, &end, 0);

		if (*end || cpu < 0 || cpu >= 4096) {
			snprintf(c.reason, sizeof(c.reason), "PMUFARM_CPU='%s' is not a CPU number", env);
			return emit(c.probe->name, PROBE_ERROR, c.reason, &obs, now_ns() - t0);
		}
		c.cpu = (int)cpu;
	}
	if (c.cpu >= 0) {
		int e = pin_to_cpu(c.cpu);

		if (e) {
			snprintf(c.reason, sizeof(c.reason), "cannot pin to cpu %d: %s", c.cpu, strerror(e));
			return emit(c.probe->name, PROBE_ERROR, c.reason, &obs, now_ns() - t0);
		}
	}

	if (epmu_active()) {
		const char *why = epmu_probe_unsupported(c.probe->name);

		if (epmu_check(c.reason, sizeof(c.reason)))
			return emit(c.probe->name, PROBE_ERROR, c.reason, &obs, now_ns() - t0);
		if (why) {
			snprintf(c.reason, sizeof(c.reason), "emulated PMU: %s", why);
			return emit(c.probe->name, PROBE_UNSUPPORTED, c.reason, &obs, now_ns() - t0);
		}
	}
	caps_collect(&caps);
	c.caps = &caps;
	c.l = caps.layout;
	c.pmu = caps.kvm_pmu;
	if (c.probe->needs_pmu && caps.nreasons) {
		char why[sizeof(c.reason) - 64];

		caps_reason(&caps, why, sizeof(why));
		env = getenv("PMUFARM_VPMU_FORCE");
		if (!env || strcmp(env, "1") || !c.l) {
			snprintf(c.reason, sizeof(c.reason), "%s", why);
			ret = emit(c.probe->name, PROBE_UNSUPPORTED, c.reason, &obs, now_ns() - t0);
			caps_free(&caps);
			return ret;
		}
		/*
		 * Forced: run anyway, and say so in the reason whatever the outcome.  With no PMU
		 * enumerated, assume the vendor's mediated-capable shape so that every probe path
		 * runs; the observations then show what this KVM really does with those MSRs.
		 */
		if (c.pmu.gp == 0)
			assume_pmu(&c);
		c.obs = &obs;
		json_obj_begin(&obs, NULL);
		st = c.probe->run(&c);
		json_obj_end(&obs);
		{
			char r[sizeof(c.reason)];

			snprintf(r, sizeof(r), "FORCED despite: %.600s%s%.300s", why,
				 c.reason[0] ? "; " : "", c.reason);
			snprintf(c.reason, sizeof(c.reason), "%s", r);
		}
	} else {
		c.obs = &obs;
		json_obj_begin(&obs, NULL);
		st = c.probe->run(&c);
		json_obj_end(&obs);
	}
	/* "unsupported" carries no observations; an error keeps what was seen, for diagnosis. */
	if (st == PROBE_UNSUPPORTED)
		json_free(&obs);
	ret = emit(c.probe->name, st, c.reason, &obs, now_ns() - t0);
	json_free(&obs);
	caps_free(&caps);
	return ret;
}

/* --pmu emulated[:LAYOUT] sets PMUFARM_EPMU, which every part of the harness reads. */
static int pmu_option(const char *val)
{
	char vendor[13];

	if (!strcmp(val, "real"))
		return unsetenv(EPMU_ENV);
	if (!strncmp(val, "emulated:", 9) && val[9])
		return setenv(EPMU_ENV, val + 9, 1);
	if (strcmp(val, "emulated")) {
		fprintf(stderr, "vpmu: --pmu %s: expected real, emulated or emulated:LAYOUT (%s)\n", val,
			epmu_layout_names());
		return -1;
	}
	cpuid_vendor(&host_cpuid_view, vendor);
	return setenv(EPMU_ENV, strcmp(vendor, "AuthenticAMD") ? "intel" : "amd", 1);
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "--pmu")) {
		if (pmu_option(argv[2]))
			return EXIT_ERROR;
		argv[2] = argv[0];
		argv += 2;
		argc -= 2;
	}
	if (argc >= 2 && !strcmp(argv[1], "caps") && argc == 2)
		return cmd_caps();
	if (argc >= 2 && !strcmp(argv[1], "list") && argc == 2)
		return cmd_list();
	if (argc >= 3 && !strcmp(argv[1], "run"))
		return cmd_run(argc - 2, argv + 2);
	if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
		usage(stdout);
		return EXIT_OK;
	}
	usage(stderr);
	return EXIT_ERROR;
}
