# The two commands: `make demo` (whole pipeline on the embedded dataset) and `make test`.
# Both set themselves up on a fresh clone: system packages, virtual environment, install.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONSTRAINTS := requirements/constraints.txt
# numpy's AVX-512 kernels round differently from its AVX2 ones: with them `vbiopsy synth` writes
# another data/raw than data.dvc records (scripts/python.sh says more). Every target runs numpy
# without its X86_V4 (AVX-512) dispatch unless the caller sets NPY_DISABLE_CPU_FEATURES (empty: keep it).
NPY_DISABLE_CPU_FEATURES ?= X86_V4
export NPY_DISABLE_CPU_FEATURES

.PHONY: help demo test install system-deps retrain ui plots bench screenshots clean paper-smoke

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## virtual environment with the pinned requirements, offline page template for dvc plots
	@$(PY) scripts/dvc_plots_template.py

system-deps:  ## Debian packages the tests need (PostgreSQL server binaries)
	@bash scripts/install_system_deps.sh

test: system-deps install  ## set up, then run the whole test suite (2 workers; the e2e tests share one)
	$(BIN)/pytest -n 2 --dist loadgroup

demo: install  ## set up, synthesise the embedded dataset if missing, dvc repro, say where results are
	@bash scripts/demo.sh

retrain: install  ## what CI's retraining workflow does: pull, repro, gate, push, diff against main
	@bash scripts/retrain.sh

ui: install  ## serve the MLflow UI on the embedded store (prints the pages to open, in model-training mode)
	@MLFLOW_TRACKING_URI= $(BIN)/vbiopsy pipeline links
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --port 5000

plots: install  ## dvc plots show: ROC per setting, Figures 3-5 in dvc_plots/index.html (works offline)
	$(BIN)/dvc plots show

bench: install  ## speed and memory benchmarks (bench/)
	for b in preprocess generator classifier predict gpu_profile; do $(PY) bench/$$b.py || exit 1; done

paper-smoke: install  ## every stage at the paper's sizes, counts capped, in a copy under $TMPDIR; wall time, peak RSS (not in make test)
	@$(PY) scripts/paper_smoke.py

clean:  ## remove pipeline outputs (keeps data/raw and the venv)
	rm -rf data/interim data/processed data/splits data/imputed models outputs reports mlruns
