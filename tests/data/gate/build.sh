#!/bin/sh
# A "kernel build" for tests/test_gate.py: fails like a compiler would when the tree says so, and
# otherwise produces a build stamp. The simulated kernel's behaviour is the tree's pmufarm-sim.yaml.
set -e
if grep -n '#error' drivers/kvm/pmu.c; then
    echo "drivers/kvm/pmu.c: error: #error directive: build broken on purpose" >&2
    exit 1
fi
echo "CC      drivers/kvm/pmu.o"
echo "LD      vmlinux ($PMUFARM_GATE_ROLE)"
mkdir -p .build && git rev-parse HEAD > .build/stamp
