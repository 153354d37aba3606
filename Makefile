# Common tasks. `make test` is what CI runs (after `make install`).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test test-all test-slow lint bench kaggle-rehearsal

install:  ## torch first (the CPU build 2.13.0), then the package pinned by constraints.txt
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test]"

demo:
	hybridstack demo --workdir demo-runs

test:
	$(PYTHON) -m pytest -q

test-all:  ## the default suite plus the slow real-data and multi-process tests (what CI runs)
	$(PYTHON) -m pytest -q -m "not gpu"

test-slow:
	$(PYTHON) -m pytest -q -m slow

lint:
	ruff check hybridstack tests bench

bench:
	$(PYTHON) bench/run_all.py

# Stage time, peak RSS and disk vs train rows (resumable ladder; data and runs under /tmp):
#   make bench-scale [SIZES=10000,20000] [OUT=bench/results/scale.json]
SIZES ?= 10000,20000,40000,80000,160000
OUT ?= bench/results/scale.json

.PHONY: bench-scale
bench-scale:
	$(PYTHON) bench/bench_scale.py --sizes $(SIZES) --out $(OUT)

kaggle-rehearsal:  ## slow (~10 min): the README's Kaggle notebook on a CPU under a fake /kaggle; CI runs it
	$(PYTHON) scripts/kaggle_rehearsal.py

# Offline wheelhouse for Kaggle (torch comes with the image and is left out):
#   make wheels [PYTHON_VERSION=3.12] [EXTRAS=demo] [WHEELHOUSE=dist/wheelhouse-py312]
# then, offline: pip install --no-index --find-links DIR -c DIR/constraints.txt hybridstack
WHEELHOUSE ?= dist/wheelhouse
PYTHON_VERSION ?=
EXTRAS ?=

.PHONY: wheels
wheels:
	$(PYTHON) scripts/wheelhouse.py --out $(WHEELHOUSE) $(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION)) $(if $(EXTRAS),--extras $(EXTRAS))
