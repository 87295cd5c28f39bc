# Set-up happens on first use: `make demo` and `make test` create .venv and install into it.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install clean

install: $(STAMP)

# torch first, pinned, so that a CPU machine takes the local CPU build; everything else is
# then installed under a constraint that keeps that torch.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rewardiff demo --out runs/demo

# the suite runs in parallel processes (pytest-xdist), one a core up to four; tests of one
# xdist_group share a worker (and the fixtures they build)
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadgroup

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadgroup -m "not slow"

clean:
	rm -rf $(VENV) runs
