# lift3d: one target per stage, plus install / demo / test / bench / verdict.
#   make demo                  set up, then run the whole pipeline on the embedded synthetic data
#   make test                  set up, then lint (ruff) and run the test suite
#   make verdict               the demo's verdict with 3 fine-tuning seeds (mean and spread)
#   make frames CONFIG=my.yaml ARGS="-o cluster.n_workers=8"   one stage, your config
VENV    ?= .venv
PY      := $(VENV)/bin/python
LIFT3D  := $(VENV)/bin/lift3d
CONFIG  ?=
ARGS    ?=
CFG     := $(if $(CONFIG),-c $(CONFIG),) $(ARGS)
STAGES  := frames teacher points pretrain finetune distill2d

.PHONY: install demo test bench verdict status all $(STAGES)

install:
	@bash scripts/install.sh

$(STAGES): install
	$(LIFT3D) run $@ $(CFG)

all: install
	$(LIFT3D) run all $(CFG)

status: install
	$(LIFT3D) status $(CFG)

demo: install
	bash scripts/demo.sh $(CFG)

test: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; OMP_NUM_THREADS=1 $(PY) $$b || exit 1; done

verdict: install
	$(LIFT3D) run frames $(CFG) && $(LIFT3D) run teacher $(CFG) && $(LIFT3D) run points $(CFG)
	OMP_NUM_THREADS=2 $(LIFT3D) verdict --seeds 0,1,2 --la-points 20 $(CFG)
