# pmufarm: one entry point for setup, the native harness and the tests.
PYTHON ?= python3
APT_PACKAGES ?= chromium cpuid

.PHONY: setup native test lint bench clean

setup:
	$(PYTHON) -m pip install -q -e '.[test]'
	@# Debian extras: chromium renders the HTML matrix test, cpuid decodes dumps; tests skip naming what is missing.
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null \
	    || echo "setup: could not install$$missing; the tests that need them will skip"; fi
	$(MAKE) -s native

native:
	$(MAKE) -s -C agent/native all asan

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q tests

bench: setup
	$(PYTHON) bench/run.py

clean:
	$(MAKE) -s -C agent/native clean
