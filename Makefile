# Self-bootstrapping targets: `make demo` and `make test` work on a fresh clone.
# torch is installed first and pinned (a bare `torch` requirement pulls GBs of CUDA wheels);
# GPU users override it, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.vlmcredit-installed

.PHONY: setup test demo lint format bench browser-test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo "==> setting up $(VENV) (first time: a few minutes; later runs skip this)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing $(TORCH_SPEC) (CPU build unless TORCH_SPEC says otherwise)"
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	@echo "==> installing vlmcredit and its [$(EXTRAS)] extras (transformers, trl, igraph, ...)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@# verl pins transformers<5.11 and transferqueue ray[default]; both run beside what the verl
	@# extra installs (tests/export/test_verl*.py run verl's trainer mode and losses)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps verl==0.9.1 transferqueue==0.1.11
	@touch $(STAMP)
	@echo "==> ready: run commands as $(VENV)/bin/vlmcredit (or: source $(VENV)/bin/activate)"

test: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/vlmcredit demo --out demo-out

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Renders the demo report in headless Chromium (needs `apt-get install -y chromium`) and fails
# on console errors, network requests or broken images; writes docs/img/demo-report.png.
browser-test: $(STAMP)
	@test -d demo-out/runs/anchors || $(VENV)/bin/vlmcredit demo --out demo-out
	$(PY) scripts/browser_check.py demo-out/report.html --height 2000 --screenshot docs/img/demo-report.png

bench: $(STAMP)
	$(PY) benchmarks/capture.py
	$(PY) benchmarks/anchors.py
	$(PY) benchmarks/probe_heads.py

clean:
	rm -rf $(VENV) demo-out report-screenshot.png .pytest_cache .ruff_cache
