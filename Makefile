# lazysnap — the two commands a new machine needs: `make test` and `make demo`.
# Both install what is missing first (Debian packages as root, a .venv for Python).

APT_PACKAGES := containerd runc docker-registry skopeo umoci busybox-static fuse3 \
                libfuse3-dev pkg-config stargz-snapshotter python3 python3-venv python3-dev gcc openssl \
                flatbuffers-compiler pigz zlib1g-dev erofs-utils apache2-utils
VENV   := .venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test typecheck test-unit test-component test-system demo bench fuzz deps apt-deps venv proto clean install

# Type checking first: it takes seconds, the suite minutes.
test: deps typecheck
	$(PYTHON) -m pytest -v $(PYTEST_ARGS)

# mypy over the package, configured in pyproject.toml ([tool.mypy]).
typecheck: venv
	$(VENV)/bin/mypy snapshotter

# The suite's three tiers, each alone (tests/conftest.py says which test is which):
# unit needs neither root nor processes; component mounts, starts a registry or one daemon;
# system runs containerd and containers.
test-unit: venv
	$(PYTHON) -m pytest -q -m unit $(PYTEST_ARGS)

test-component: deps
	$(PYTHON) -m pytest -q -m component $(PYTEST_ARGS)

test-system: deps
	$(PYTHON) -m pytest -q -m integration $(PYTEST_ARGS)

# Property-based fuzzing of the parsers with the long budget (50,000 examples a test, random, with
# hypothesis' example database in .hypothesis/; `make test` runs the same tests with a fixed CI budget).
# Hours, not minutes: narrow it with PYTEST_ARGS, e.g. PYTEST_ARGS="-k tar_scanner".
fuzz: deps
	HYPOTHESIS_PROFILE=fuzz $(PYTHON) -m pytest -q -o timeout=0 --hypothesis-show-statistics \
		tests/unit/test_fuzz_*.py $(PYTEST_ARGS)

demo: deps
	$(PYTHON) -m tests.demo

# Cold-start and read benchmarks against containerd's overlayfs (not part of `make test`;
# about 25 minutes; results and method in benchmarks/RESULTS.md).
bench: deps
	$(MAKE) apt-deps APT_PACKAGES="debootstrap fio"
	$(PYTHON) -m benchmarks.run --modes overlayfs,estargz,soci $(BENCH_ARGS)
	$(PYTHON) -m benchmarks.run --modes overlayfs,estargz,soci --loopback $(BENCH_ARGS)
	$(PYTHON) -m benchmarks.micro

deps: apt-deps venv

# Installs only what dpkg does not already have, so a prepared machine skips apt.
apt-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root to install packages" >&2; exit 1; fi; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

# Installs lazysnap on a node (not needed for `make test` or `make demo`): a venv of its own
# at INSTALL_VENV (Debian 12+ refuse `pip install` into the system Python, PEP 668), the
# command linked into INSTALL_BIN, the unit into INSTALL_UNIT with ExecStart pointing at
# both, and the example config into INSTALL_ETC only when none is there (an operator's
# config is never overwritten). Run again to upgrade. Override on the command line only:
#   make install INSTALL_VENV=/opt/lazysnap INSTALL_BIN=/usr/local/bin \
#                INSTALL_ETC=/etc/lazysnap INSTALL_UNIT=/etc/systemd/system
INSTALL_VENV := /opt/lazysnap
INSTALL_BIN  := /usr/local/bin
INSTALL_ETC  := /etc/lazysnap
INSTALL_UNIT := /etc/systemd/system
# fuse3 at run time; the rest build pyfuse3 (from source: PyPI has no wheel of it).
INSTALL_APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3 python3-venv python3-dev
PIP_INSTALL_ARGS ?=

install:
	$(MAKE) apt-deps APT_PACKAGES="$(INSTALL_APT_PACKAGES)"
	test -x $(INSTALL_VENV)/bin/python || python3 -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/python -m pip install -q $(PIP_INSTALL_ARGS) --upgrade pip
	$(INSTALL_VENV)/bin/python -m pip install -q $(PIP_INSTALL_ARGS) .   # a local path is always reinstalled
	install -d $(INSTALL_BIN) $(INSTALL_UNIT) $(INSTALL_ETC)
	ln -sfn $(INSTALL_VENV)/bin/lazysnap $(INSTALL_BIN)/lazysnap
	sed -e 's|/usr/local/bin/lazysnap|$(INSTALL_BIN)/lazysnap|' \
	    -e 's|/etc/lazysnap/config.toml|$(INSTALL_ETC)/config.toml|' \
	    systemd/lazysnap.service > $(INSTALL_UNIT)/lazysnap.service.tmp
	chmod 0644 $(INSTALL_UNIT)/lazysnap.service.tmp
	mv $(INSTALL_UNIT)/lazysnap.service.tmp $(INSTALL_UNIT)/lazysnap.service
	@if [ -e $(INSTALL_ETC)/config.toml ]; then \
		echo "kept $(INSTALL_ETC)/config.toml (the example with every default: systemd/config.toml)"; \
	else install -m 0644 systemd/config.toml $(INSTALL_ETC)/config.toml; fi
	@if [ "$(INSTALL_UNIT)" = /etc/systemd/system ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed $$($(INSTALL_BIN)/lazysnap --version 2>/dev/null || echo lazysnap)." \
	      "Next: containerd's config (systemd/containerd-config.toml for 1.6/1.7," \
	      "systemd/containerd2-config.toml for 2.x), then" \
	      "systemctl enable --now lazysnap && systemctl restart containerd"

# Regenerates snapshotter/api/ (protobuf) and snapshotter/formats/ztoc_fbs/ (flatbuffers) from proto/;
# tests check both are current.
proto: venv
	$(PYTHON) proto/generate.py
	$(PYTHON) proto/generate_ztoc.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
