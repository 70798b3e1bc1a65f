# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# tcmalloc where the machine has it: the demo DiT's XLA:CPU step is 0.76x with it (launch/tcmalloc.sh)
PRELOAD := $(shell launch/tcmalloc.sh)

.PHONY: install demo test clean

$(BIN)/mirage-jax: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/mirage-jax

demo: install
	LD_PRELOAD=$${LD_PRELOAD:-$(PRELOAD)} $(BIN)/mirage-jax demo --workdir demo_out

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests  # whole files, heaviest first (tests/conftest.py)

clean:
	rm -rf $(VENV) demo_out *.egg-info
