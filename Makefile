# vfs — two commands: `make test` and `make demo`. Both install what they need, idempotently.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# gcc, libc6-dev, python3-dev, libfuse3-dev, pkg-config, git: the patched pyfuse3 is compiled here
# erofs-utils: fsck.erofs checks the template images the kernel engine writes (tests)
APT_PACKAGES := fuse3 libfuse3-dev pkg-config qemu-system-x86 qemu-utils nginx-light fio openssl \
                curl fuse-overlayfs rsync git xz-utils e2fsprogs gcc libc6-dev python3-dev \
                debootstrap apt-utils libnbd-bin nbdkit python3-libnbd erofs-utils iproute2
STAMP := $(VENV)/.installed
# pyfuse3 3.5.0 from PyPI with the patches of tools/pyfuse3 (README there), built into the venv
# before the project is installed, so pip never fetches the unpatched one.
PYFUSE3 := tools/pyfuse3
PYFUSE3_INPUTS := $(PYFUSE3)/build.py $(PYFUSE3)/series $(PYFUSE3)/build-constraints.txt \
                  $(wildcard $(PYFUSE3)/patches/*.patch)

.PHONY: all setup deps venv test lint demo bench clean

all: test

# python3-venv: `python3 -m venv` (a minimal Debian 12 lacks it). README "The two commands" lists
# BASE_PACKAGES and APT_PACKAGES (tests/tools/test_repo_docs.py holds the lists equal).
BASE_PACKAGES := python3-venv

# System packages: installed only when something is missing (the second run is quick).
deps:
	@missing=""; for p in $(BASE_PACKAGES) $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install:$$missing" >&2; exit 1; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml $(PYFUSE3_INPUTS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) $(PYFUSE3)/build.py
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

# build.py returns at once when the patched build is installed; it runs every time so that a
# pyfuse3 replaced behind make's back (pip install pyfuse3) is rebuilt.
venv: deps $(STAMP)
	@$(PY) $(PYFUSE3)/build.py

setup: venv

lint: venv
	$(VENV)/bin/ruff check vfs vmctl tools tests
	$(VENV)/bin/ruff format --check vfs vmctl tools tests

# pytest exits 5 when it collected nothing: that must never pass as green.
test: setup lint
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

demo: setup
	$(PY) tools/demo.py

bench: setup
	$(PY) -m tools.bench.redirect
	$(PY) -m tools.bench.template
	$(PY) -m tools.bench.image
	$(PY) -m tools.bench.tree
	$(PY) -m tools.bench.export
	$(VENV)/bin/pip install -q urllib3 httpx  # the peers of the HTTP client bench only
	$(PY) -m tools.bench.http_client

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
