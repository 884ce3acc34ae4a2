# The two set-up-and-run commands of the README. Each creates the virtualenv (.venv) when it is missing and
# (re)installs the package when pyproject.toml changed, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

# The main job. Until the pipeline exists it is the kernel benchmark (fused vs reference).
run: $(STAMP)
	$(PY) -m rlhf_kernels.bench

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
