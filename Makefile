# Set-up and everyday commands. `make demo` installs into .venv and runs the demo job; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# The exact wheels CI pins; override on other machines, e.g. make TORCH_SPEC="torch>=2.4 torchvision>=0.19" demo
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint bench-quick mutation clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) -m dg_meta.train --algorithm MLDG

# pytest exits 5 when it collects nothing (e.g. a filtered run): that is not a failure. Two workers of one torch
# thread each (pytest-xdist) use both cores of a 2-core machine without oversubscribing them; tests/conftest.py hands
# each worker the next test as it frees up, slow tests first, so both workers end together.
# OMP_WAIT_POLICY=PASSIVE: the few tests that run two intra-op threads would otherwise keep them spinning after
# each parallel region, beside the other worker (the threads engine's tests: 14-16 s per case instead of 0.6 s).
test: install
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -ra --durations=15 -n 2; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

lint: install
	$(VENV)/bin/ruff check .

# mutation testing of the algorithm files with their own fast tests (not in CI: minutes per file; docs/quality.md)
# e.g. make mutation FILES="algorithms/erm.py algorithms/protonet.py"; no FILES: every file bench/mutation.py maps
mutation: install
	OMP_NUM_THREADS=1 $(PY) bench/mutation.py $(FILES)

clean:
	rm -rf outputs .pytest_cache .ruff_cache *.egg-info
