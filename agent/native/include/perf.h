/* SPDX-License-Identifier: GPL-2.0 */
/* Host-side perf events and /proc/interrupts counters used by the isolation and PMI probes. */
#ifndef PMUFARM_PERF_H
#define PMUFARM_PERF_H

#include <stdbool.h>
#include <stdint.h>

/*
 * A hardware "instructions" event on the calling thread (pid 0, any CPU), created disabled.
 * Returns 0 with *fd set, or the errno of perf_event_open.
 */
int perf_open_instructions(bool exclude_guest, bool exclude_kernel, int *fd);
void perf_start(int fd);
/* Stop and read; -1 on a read error. */
int64_t perf_stop_read(int fd);
/* Sum over CPUs of the /proc/interrupts row whose label is `label` ("VPMI", "NMI"); -1 if absent. */
int64_t proc_interrupts(const char *label);

#endif
