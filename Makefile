# The two set-up-and-run commands of the README. Each creates the virtualenv (.venv) when it is missing and
# (re)installs the package when pyproject.toml changed, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

# The main job: world -> SFT -> reward model -> PPO -> diagnosis on the embedded default task, under runs/pipeline.
RUN_DIR ?= runs/pipeline
run: $(STAMP)
	$(VENV)/bin/rlhf pipeline --out $(RUN_DIR)

bench: $(STAMP)
	$(PY) -m rlhf_kernels.bench

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
