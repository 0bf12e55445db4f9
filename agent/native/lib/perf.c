// SPDX-License-Identifier: GPL-2.0
#include <errno.h>
#include <linux/perf_event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "perf.h"

int perf_open_instructions(bool exclude_guest, bool exclude_kernel, int *fd)
{
	struct perf_event_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.size = sizeof(attr);
	attr.type = PERF_TYPE_HARDWARE;
	attr.config = PERF_COUNT_HW_INSTRUCTIONS;
	attr.disabled = 1;
	attr.exclude_hv = 1;
	attr.exclude_kernel = exclude_kernel;
	attr.exclude_guest = exclude_guest;
	*fd = (int)syscall(SYS_perf_event_open, &attr, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
	if (*fd < 0) {
		int e = errno;

		*fd = -1;
		return e;
	}
	return 0;
}

void perf_start(int fd)
{
	ioctl(fd, PERF_EVENT_IOC_RESET, 0);
	ioctl(fd, PERF_EVENT_IOC_ENABLE, 0);
}

int64_t perf_stop_read(int fd)
{
	uint64_t v;

	ioctl(fd, PERF_EVENT_IOC_DISABLE, 0);
	if (read(fd, &v, sizeof(v)) != (ssize_t)sizeof(v))
		return -1;
	return (int64_t)(v & INT64_MAX);
}

int64_t proc_interrupts(const char *label)
{
	FILE *f = fopen("/proc/interrupts", "re");
	char *line = NULL;
	size_t cap = 0;
	int64_t total = -1;
	size_t n = strlen(label);

	if (!f)
		return -1;
	while (getline(&line, &cap, f) > 0) {
		char *p = line, *end;

		while (*p == ' ')
			p++;
		if (strncmp(p, label, n) || p[n] != ':')
			continue;
		total = 0;
		for (p += n + 1;; p = end) {
			unsigned long long v = strtoull(p, &end, 10);

			if (end == p)
				break;
			total += (int64_t)v;
		}
		break;
	}
	free(line);
	fclose(f);
	return total;
}
