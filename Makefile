# Flora: `make demo` runs every stage on the bundled sample world; `make test` runs the test suite.
# Both create .venv when it is missing and (re)install the project when setup.cfg changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo_out
PYTEST_ARGS ?=
# pytest-xdist workers (CI has 2 cores); each test file runs on one worker, files sharing a sample world on
# the same one (tests/conftest.py). PYTEST_ARGS come last: PYTEST_ARGS="-n 0" runs in this process.
PYTEST_WORKERS ?= 2
PYTEST_XDIST   := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: install tfjs-env js-deps browser-deps demo test test-fast lint docs s3-server bench-catalog \
	bench-catalog-growth bench-catalog-sources \
	bench-sharder bench-loader bench-verify \
	bench-training bench-export gpu-bundle gpu-check clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,test]'
	touch $(STAMP)

install: $(STAMP)

# The TF.js converters (onnx2tf, tensorflowjs) in their own venv: TensorFlow's pins clash with torch's.
TFJS_VENV  := .venv-tfjs
TFJS_STAMP := $(TFJS_VENV)/.installed-stamp
$(TFJS_STAMP): export/requirements-tfjs.txt
	test -x $(TFJS_VENV)/bin/python || $(PYTHON) -m venv $(TFJS_VENV)
	$(TFJS_VENV)/bin/pip install --quiet --upgrade pip
	$(TFJS_VENV)/bin/pip install --quiet -r export/requirements-tfjs.txt
	$(TFJS_VENV)/bin/pip install --quiet --no-deps onnx2tf==1.29.24
	touch $(TFJS_STAMP)

tfjs-env: $(TFJS_STAMP)

# TF.js for Node (@tensorflow/tfjs + the wasm backend) and playwright-core, from the lock file.
JS_STAMP := export/js/node_modules/.installed-stamp
$(JS_STAMP): export/js/package.json export/js/package-lock.json
	npm ci --prefix export/js --no-audit --no-fund --loglevel=error
	touch $(JS_STAMP)

js-deps: $(JS_STAMP)

# Debian's chromium for the browser test (never a browser download): apt-get as root, else sudo.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y --no-install-recommends chromium \
		|| { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium; }; }

# The bundled sample world is generated deterministically (seed 0): no network, no GPU.
demo: $(STAMP) $(TFJS_STAMP) $(JS_STAMP)
	$(PY) -m world.demo --out $(DEMO)

# CI runs everything but GPU tests (slow, mongo and browser included), and prints the 25 slowest.
test: $(STAMP) $(TFJS_STAMP) $(JS_STAMP) browser-deps
	$(PY) -m pytest -m "not gpu" $(PYTEST_XDIST) --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP) $(TFJS_STAMP) $(JS_STAMP)
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_XDIST) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check flora sharding loaders training export world tests benchmarks
	$(VENV)/bin/ruff format --check flora sharding loaders training export world tests benchmarks

# The documentation site (docs/, mkdocs.yml) into site/. Strict: a broken link or anchor, or a page
# missing from the nav, fails the build. mkdocs comes with the test extra (flora[docs]).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

# A local S3 server (SeaweedFS, 127.0.0.1 only) in the foreground; prints the AWS_* lines to export.
S3_DIR    ?= build/s3-data
S3_BUCKET ?= flora
s3-server: $(STAMP)
	$(PY) -m world.s3 --dir $(S3_DIR) --bucket $(S3_BUCKET)

bench-catalog: $(STAMP)
	$(PY) -m benchmarks.catalog

# 340,749 -> 900,000 records, from scratch and with --previous (frozen splits); minutes, ~1.5 GB.
bench-catalog-growth: $(STAMP)
	$(PY) -m benchmarks.catalog_growth

# JSONL, GBIF DwC-A, iNaturalist, CSV, Parquet at 340,749 and 900,000 records: time and peak memory.
bench-catalog-sources: $(STAMP)
	$(PY) -m benchmarks.catalog_sources

# img2dataset gets a venv of its own: its pins clash with the main environment.
.venv-img2dataset/bin/img2dataset:
	$(PYTHON) -m venv .venv-img2dataset
	.venv-img2dataset/bin/pip install --quiet img2dataset==1.47.0

bench-sharder: $(STAMP) .venv-img2dataset/bin/img2dataset
	$(PY) -m benchmarks.sharder --img2dataset .venv-img2dataset/bin/img2dataset

# Loader images/s: sample world + opencv-doc photographs (fetched with apt-get download), one run.
bench-loader: $(STAMP)
	$(PY) -m benchmarks.loader

# The cost of verify: full re-checks per epoch (bit rot), as a fraction of an epoch, on the photo shards.
bench-verify: $(STAMP)
	$(PY) -m benchmarks.verify

# Training-loop steps/s on the CPU (smoke teacher config): DALI vs torch loader vs compute alone.
bench-training: $(STAMP)
	$(PY) -m benchmarks.training

# The student in TF.js (Node, wasm): size, parity, batch-1 latency vs PyTorch and onnxruntime.
bench-export: $(STAMP) $(TFJS_STAMP) $(JS_STAMP)
	$(PY) -m benchmarks.export

# The GPU check. Here: `make gpu-bundle` downloads DALI (CUDA 13) and what the GPU machine lacks, adds the
# source photos, and cuts them into .gpu-bundle/part-NN (<= 60 MiB each, one per device call). There, on
# the machine's own Python and torch: each call carrying a part runs `python3 -m benchmarks.gpu_bundle
# receive`; the call carrying the last one runs `make gpu-check` (benchmarks/README.md has the steps).
gpu-bundle: $(STAMP)
	$(PY) -m benchmarks.gpu_bundle pack

GPU_PYTHON ?= python3
GPU_STAGE  ?= /tmp/flora-gpu
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_bundle receive --stage $(GPU_STAGE)
	PYTHONPATH=$(GPU_STAGE)/site:$$PYTHONPATH PYTHONUNBUFFERED=1 \
		LD_LIBRARY_PATH=$$(ls -d $(GPU_STAGE)/site/nvidia/*/lib 2>/dev/null | tr '\n' :)$$LD_LIBRARY_PATH \
		$(GPU_PYTHON) -m benchmarks.gpu --device cuda --sources $(GPU_STAGE)/photos $(GPU_CHECK_ARGS)

clean:
	rm -rf $(DEMO) .pytest_cache site
