# lazysnap — the two commands a new machine needs: `make test` and `make demo`.
# Both install what is missing first (Debian packages as root, a .venv for Python).

APT_PACKAGES := containerd runc docker-registry skopeo umoci busybox-static fuse3 \
                libfuse3-dev pkg-config stargz-snapshotter python3 python3-venv python3-dev gcc openssl \
                flatbuffers-compiler pigz zlib1g-dev erofs-utils
VENV   := .venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test demo bench deps apt-deps venv proto clean

test: deps
	$(PYTHON) -m pytest -v $(PYTEST_ARGS)

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

# Regenerates snapshotter/api/ (protobuf) and snapshotter/formats/ztoc_fbs/ (flatbuffers) from proto/;
# tests check both are current.
proto: venv
	$(PYTHON) proto/generate.py
	$(PYTHON) proto/generate_ztoc.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
