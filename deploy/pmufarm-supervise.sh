#!/bin/sh
# pmufarm-supervise ROOT HOST: keep exactly one agent worker of HOST running on a host without systemd.
#
# Started detached by `orchestrator deploy` (setsid: own session and process group, so a stop can signal
# the whole group). Writes ROOT/run/supervisor.pid and ROOT/run/worker.pid; restarts the worker when it
# exits (1 s, doubling up to 30 s while it keeps dying within 10 s of its start); SIGTERM stops the
# worker (Celery warm shutdown) and then the supervisor. ROOT/run/supervisor.lock is held (flock) by the
# supervisor and inherited by the worker, so a second supervisor cannot start while any process of the
# first one is still alive: no duplicate workers.
set -u
ROOT=$1
HOST=$2
RUN=$ROOT/run
LOG=$ROOT/log
mkdir -p "$RUN" "$LOG"

say() { echo "$(date '+%Y-%m-%dT%H:%M:%S%z') pmufarm-supervise[$$] $*"; }

if command -v flock >/dev/null 2>&1; then
    exec 9>>"$RUN/supervisor.lock"
    if ! flock -n 9; then
        say "another supervisor or worker of $ROOT holds $RUN/supervisor.lock; not starting" >&2
        exit 75
    fi
fi
echo $$ >"$RUN/supervisor.pid"

child=""
stop() {
    say "stopping worker ${child:-none}"
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null
        wait "$child" 2>/dev/null
    fi
    rm -f "$RUN/worker.pid" "$RUN/supervisor.pid"
    say "stopped"
    exit 0
}
trap stop TERM INT HUP

delay=1
while :; do
    started=$(date +%s)
    "$ROOT/bin/pmufarm-worker" "$ROOT" "$HOST" </dev/null >>"$LOG/worker.log" 2>&1 &
    child=$!
    echo "$child" >"$RUN/worker.pid"
    say "worker started: pid $child"
    wait "$child"
    rc=$?
    child=""
    rm -f "$RUN/worker.pid"
    if [ $(( $(date +%s) - started )) -ge 10 ]; then delay=1; fi
    say "worker exited with status $rc; restarting in ${delay}s"
    sleep "$delay" &
    wait $!
    delay=$(( delay * 2 ))
    if [ "$delay" -gt 30 ]; then delay=30; fi
done
