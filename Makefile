# pmufarm: one entry point for setup, the native harness and the tests.
PYTHON ?= python3
APT_PACKAGES ?= chromium cpuid busybox-static qemu-system-x86 openssh-server iproute2 redis-server linux-perf \
	dropbear-bin kexec-tools cpio openssh-sftp-server

.PHONY: setup native test lint bench clean kselftest-tree

setup:
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
	$(PYTHON) bench/run.py

# Debian's linux-source-6.12, only what the KVM PMU selftests build reads, into ~/.cache/pmufarm (~125 MB;
# suites/kselftest_kvm and its tests fetch it themselves on first use, so it is not part of setup).
kselftest-tree:
	$(PYTHON) -m agent.upstream fetch-linux-source

clean:
	$(MAKE) -s -C agent/native clean
