#!/bin/sh
# pmufarm-worker ROOT HOST: run the agent worker of HOST in the foreground.
# Started by the systemd unit (ExecStart) or by pmufarm-supervise; installed by `orchestrator deploy`
# as ROOT/bin/pmufarm-worker. ROOT/etc/agent.env (mode 0600, written by deploy) names the release:
# PMUFARM_RELEASE (its venv runs the worker), PMUFARM_TREE (the suites it may run), PMUFARM_REVISION,
# and FARM_BROKER_URL (holds the broker password: never echo it).
set -eu
ROOT=$1
HOST=$2
set -a
. "$ROOT/etc/agent.env"
set +a
cd "$PMUFARM_TREE"
exec "$PMUFARM_RELEASE/venv/bin/python" -m agent.cli worker --host "$HOST"
