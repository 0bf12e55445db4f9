# pmufarm: one entry point for setup, the native harness and the tests.
# Stock Debian/Ubuntu Python is externally managed (PEP 668): pip refuses to install into it. For such a
# Python `make setup` makes a venv (.venv) and every target uses its python; run the commands as
# .venv/bin/orchestrator or after `. .venv/bin/activate`. Any other Python (pyenv, an active venv, conda)
# is used as it is. PYTHON=... on the command line overrides both.
BASE_PYTHON ?= python3
VENV ?= .venv
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell $(BASE_PYTHON) -c 'import os, sys, sysconfig; print("$(VENV)/bin/python" if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else "$(BASE_PYTHON)")')
endif
APT_PACKAGES ?= chromium cpuid busybox-static qemu-system-x86 openssh-server iproute2 redis-server linux-perf \
	dropbear-bin kexec-tools cpio openssh-sftp-server libcapstone-dev

.PHONY: setup native test lint bench clean kselftest-tree

setup:
	@if [ "$(PYTHON)" = "$(VENV)/bin/python" ] && [ ! -x "$(VENV)/bin/python" ]; then \
	  echo "setup: $(BASE_PYTHON) is externally managed (PEP 668): installing into a venv, $(VENV)"; \
	  $(BASE_PYTHON) -m venv "$(VENV)" 2>/dev/null || { \
	    if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; fi; \
	    $(BASE_PYTHON) -m venv "$(VENV)"; } || { echo "setup: no venv module: apt-get install python3-venv"; exit 1; }; fi
	$(PYTHON) -m pip install -q -e '.[test]'
	@# Debian extras: chromium renders the HTML matrix test, cpuid decodes dumps, busybox + qemu boot the perf
	@# guest, sshd + iproute2 make the deploy test's hosts. Tests skip naming whatever is missing.
	@# dropbear-bin + kexec-tools + cpio build the QEMU farm host of the gate's kexec test.
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null \
	    || echo "setup: could not install$$missing; the tests that need them will skip"; fi
	$(MAKE) -s native
	@# A bootable guest kernel (Debian's linux-image, unpacked into ~/.cache/pmufarm, not installed).
	-$(PYTHON) -m agent.guestimage fetch-kernel

native:
	$(MAKE) -s -C agent/native all asan
	$(MAKE) -s -C agent/native/guest

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q tests

bench: setup
	$(PYTHON) bench/run.py --publish

# Debian's linux-source-6.12, only what the KVM PMU selftests build reads, into ~/.cache/pmufarm (~125 MB;
# suites/kselftest_kvm and its tests fetch it themselves on first use, so it is not part of setup).
kselftest-tree:
	$(PYTHON) -m agent.upstream fetch-linux-source

clean:
	$(MAKE) -s -C agent/native clean
