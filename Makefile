# trustdb: the entry points a person or CI uses. `make help` lists them.
PYTHON ?= python3
KERNEL ?= 6.12

.PHONY: help deps bpf demo test test-host test-lsm bench wheel deb rpm clean

help:
	@echo "make demo    set up a fresh machine and run the main job"
	@echo "make test    set up and run the whole test suite (host + VM tiers)"
	@echo "make bpf     build the BPF objects into build/bpf/"
	@echo "make test-lsm KERNEL=6.1|6.12   run the BPF LSM tier in QEMU"
	@echo "make bench   run the benchmarks under bench/"
	@echo "make wheel   build/dist/trustdb-*.whl, carrying the BPF objects (python -m build)"
	@echo "make deb     build/deb/trustdb_*_amd64.deb (Debian 12, its own python3)"
	@echo "make rpm     build/rpm/trustdb-*.x86_64.rpm (Fedora layout, python3.11)"

deps:
	bash packaging/install-deps.sh

bpf:
	$(MAKE) -C bpf

demo: deps bpf
	bash packaging/demo.sh

test: deps bpf
	$(PYTHON) -m pytest -q tests

test-lsm: deps bpf
	TRUSTDB_VM_KERNELS="$(KERNEL)" $(PYTHON) -m pytest -q tests/vm

bench: deps bpf
	for b in bench/*.py; do $(PYTHON) $$b || exit 1; done

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL := build/dist/trustdb-$(VERSION)-py3-none-any.whl

wheel: $(WHEEL)
$(WHEEL): deps
	rm -rf build/dist && $(PYTHON) -m build --wheel --outdir build/dist .

deb: $(WHEEL)
	bash packaging/deb/build.sh --wheel $(WHEEL)

rpm: $(WHEEL)
	bash packaging/rpm/build.sh --wheel $(WHEEL)

clean:
	$(MAKE) -C bpf clean
