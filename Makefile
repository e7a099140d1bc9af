# The two commands of the README. Both create .venv at the repository root when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

DEMO_WORKDIR ?= demo_work
# pytest-xdist workers of `make test` / `make test-fast`: whole files go to a worker
# (--dist loadfile), so a file's module fixtures are built once. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
PYTEST := TF_CPP_MIN_LOG_LEVEL=3 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo serve test test-fast lint install

$(VENV)/.installed: setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: tfmet needs Python 3.11 (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,beam,web]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	TF_CPP_MIN_LOG_LEVEL=3 $(VENV)/bin/tfmet-demo --workdir "$(DEMO_WORKDIR)"

# After `make demo`: its recogniser (real model) in tfmet-serve's page on 127.0.0.1; the script
# is the demo's two printed commands (export, serve). SERVE_FLAGS go to tfmet-serve (--port=8081).
serve: $(VENV)/.installed
	@test -f "$(DEMO_WORKDIR)/serve.sh" || { echo "make serve shows the demo's recogniser: run make demo first"; exit 2; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" TF_CPP_MIN_LOG_LEVEL=3 sh "$(DEMO_WORKDIR)/serve.sh" $(SERVE_FLAGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

test: $(VENV)/.installed lint
	@# pytest exits 5 when it collects no tests: that is not a failure of the suite.
	$(PYTEST) --durations=15 tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The suite without the tests marked `slow` (those that start programs in subprocesses):
# a quick check while working; `make test` (and CI) still run everything.
test-fast: $(VENV)/.installed lint
	$(PYTEST) -m "not slow" tests
