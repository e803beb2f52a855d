# lift3d: one target per stage, plus install / demo / test / bench / verdict.
#   make demo                  set up, then run the whole pipeline on the embedded synthetic data
#   make test                  set up, then lint (ruff) and run the test suite
#   make verdict               the demo's verdict with seeds 0,1,2 (SEEDS=0,1,2,3,4 for five), paired by seed
#   (demo and verdict use configs/demo.yaml unless CONFIG is given)
#   make frames CONFIG=my.yaml ARGS="-o cluster.n_workers=8"   one stage, your config
VENV    ?= .venv
PY      := $(VENV)/bin/python
LIFT3D  := $(VENV)/bin/lift3d
CONFIG  ?=
ARGS    ?=
CFG     := $(if $(CONFIG),-c $(CONFIG),) $(ARGS)
VCFG    := -c $(or $(CONFIG),configs/demo.yaml) $(ARGS)
SEEDS   ?= 0,1,2
STAGES  := frames fit2d teacher points pretrain finetune distill2d

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
	bash scripts/demo.sh $(VCFG)

test: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; OMP_NUM_THREADS=1 $(PY) $$b || exit 1; done

verdict: install
	$(LIFT3D) run frames $(VCFG) && $(LIFT3D) run fit2d $(VCFG) && $(LIFT3D) run teacher $(VCFG) && $(LIFT3D) run points $(VCFG)
	$(LIFT3D) verdict --seeds $(SEEDS) --la-points 20 --rooms 4 --methods ppnce,soft_ce,ppnce_imagenet $(VCFG)
