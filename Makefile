# Set-up and everyday commands. `make demo` and `make test` install what they need.
PYTHON ?= python3
VENV ?= .venv
# Use the active virtualenv/conda env if there is one, else a local .venv.
ifdef VIRTUAL_ENV
  PY := $(VIRTUAL_ENV)/bin/python
else ifdef CONDA_PREFIX
  PY := $(CONDA_PREFIX)/bin/python
else
  PY := $(VENV)/bin/python
endif
STAMP := $(dir $(PY)).vmatdose-installed

.PHONY: install demo test test-fast smoke bench bench-recipe-step bench-recipe-speed bench-openkbp experiments lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Torch first: keep a torch the user installed (e.g. a CUDA build); otherwise take the
# CPU build 2.13.0 (on this machine's disk) instead of an unpinned multi-GB CUDA download.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@# rt-utils pulls the GUI opencv-python; without libGL its cv2 cannot load: keep headless
	$(PY) -c "import cv2" 2>/dev/null || { $(PY) -m pip uninstall -q -y opencv-python && \
	  $(PY) -m pip install -q --force-reinstall --no-deps opencv-python-headless; }
	$(PY) -c "import cv2"
	touch $(STAMP)

install: $(STAMP)

## The main job: generate the phantom set, train, evaluate on the test split (CPU, minutes).
demo: install
	$(PY) -m vmatdose.train task_name=demo

## The whole suite, CI's command (CPU, 6.5 minutes on 2 cores, measured): two xdist workers
## of one torch thread each, a test file per worker at a time (the README's commands,
## tests/test_readme.py, on one worker while the other runs the rest).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

## The inner loop (CPU, 1.4 minutes on 2 cores, measured): no command started, no `slow` test.
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not cli and not slow"

## One-minute end-to-end check.
smoke: install
	$(PY) -m vmatdose.train debug=smoke

## Benchmarks: print tables, write benchmarks/results/*.json (bench-openkbp and
## bench-recipe-speed apart: they train on the full OpenKBP set).
bench: install
	@for f in $(filter-out benchmarks/bench_openkbp.py benchmarks/bench_recipe_speed.py,$(wildcard benchmarks/bench_*.py)); do \
		echo "== $$f"; $(PY) $$f || exit 1; done

## Where one step of experiment=openkbp_cpu goes (data, forward, backward, optimizer,
## Lightning) against the bare network step, interleaved (OpenKBP sample; 3 min on 2 quiet
## cores) -> benchmarks/results/recipe_step.json. `make bench` runs it too.
bench-recipe-step: install
	$(PY) benchmarks/bench_recipe_step.py

## Steps per second of experiment=openkbp_cpu against the recipe when issue 30 opened:
## 240 steps each from scratch, `python -m vmatdose.train` as a user runs it (full OpenKBP
## set; about 8 min on 2 cores) -> benchmarks/results/recipe_speed.json.
bench-recipe-speed: install
	$(PY) benchmarks/bench_recipe_speed.py

## OpenKBP speed-run: experiment=openkbp_cpu from scratch (35 min on 2 cores), official
## scores on the 33 validation patients -> benchmarks/results/openkbp_cpu.json.
bench-openkbp: install
	$(PY) benchmarks/bench_openkbp.py

## Index the runs on disk (debug runs left out) into experiments/runs_index.md and
## experiments/runs_comparison/ (both git-ignored); experiments/README.md, the committed
## history, is not touched.
experiments: install
	$(PY) -m vmatdose.compare $(wildcard outputs multirun) --output experiments/runs_comparison \
		--index experiments/runs_index.md --exclude '*/debug/*'

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache
