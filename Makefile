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

.PHONY: bench-scale bench-scale-smoke
bench-scale:
	$(PYTHON) bench/bench_scale.py --sizes $(SIZES) --out $(OUT)

# CI: the ladder's machinery on both datasets at 1,000 and 2,000 rows, with 3 folds and
# smaller TF-IDF vocabularies, sequences and head bounds (~5 minutes on 2 cores), then
# resumed: --no-run must find every rung finished and rebuild the summary from their JSON.
SMOKE_DIR ?= /tmp/hybridstack-scale-smoke
SMOKE_ARGS = --sizes 1000,2000 --out $(SMOKE_DIR)/scale.json --workdir $(SMOKE_DIR)/work \
	--lgbm-rounds 10 --mlp-epochs 3 --ft-train-rows 400 --set cv.n_splits=3 \
	--set tfidf.max_word_features=20000 --set tfidf.max_char_features=20000 \
	--set embed.max_seq_length=128 --set finetune.max_length=128
bench-scale-smoke:
	rm -rf $(SMOKE_DIR)
	$(PYTHON) bench/bench_scale.py $(SMOKE_ARGS)
	$(PYTHON) bench/bench_scale.py $(SMOKE_ARGS) --no-run

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
