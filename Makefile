# Set-up and everyday commands. `make test` and `make demo` each work alone on a fresh clone.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
MMEXPORT := $(VENV)/bin/mmexport
STAMP := $(VENV)/.mmexport-installed
# A bare `torch` requirement pulls several GB of CUDA wheels; pin the CPU build first.
TORCH ?= torch==2.13.0
SAMPLE ?= sample_models/digits-cnn-badnet
DEMO_OUT ?= build/demo

.PHONY: install test demo samples zoo-real bench bench-seeds eval-defence lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# One pytest worker per core (every test computes on one thread, tests/conftest.py); a test file's
# tests share a worker, so its module fixtures are built once. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= auto

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: install
	mkdir -p $(DEMO_OUT)
	$(MMEXPORT) inspect $(SAMPLE)/model.onnx --verify
	@echo "== before: $(SAMPLE)"
	$(MMEXPORT) validate $(SAMPLE)/model.onnx --data $(SAMPLE)/test.npz --attack $(SAMPLE)/attack.npz
	$(MMEXPORT) harden $(SAMPLE)/model.onnx --data $(SAMPLE)/clean.npz -o $(DEMO_OUT)/model.mmac.onnx --force
	@echo "== after MMAC (bounds in the graph): $(DEMO_OUT)/model.mmac.onnx"
	$(MMEXPORT) validate $(DEMO_OUT)/model.mmac.onnx --data $(SAMPLE)/test.npz --attack $(SAMPLE)/attack.npz
	$(MMEXPORT) detect $(SAMPLE)/model.onnx --data $(SAMPLE)/clean.npz -o $(DEMO_OUT)/model.mmdf.onnx --force
	@echo "== after MMDF (detect and fix at test time): $(DEMO_OUT)/model.mmdf.onnx"
	$(MMEXPORT) validate $(DEMO_OUT)/model.mmdf.onnx --data $(SAMPLE)/test.npz --attack $(SAMPLE)/attack.npz

samples: install
	$(PY) sample_models/build.py

# The real-size tier (32x32x3: PreAct-ResNet-18, VGG, MobileNetV2, ConvNeXt) into the git-ignored
# sample_models/real/; only missing models are built (about 10 min per ResNet-18 on a CPU).
zoo-real: install
	$(PY) sample_models/build_real.py

# One report, bench-results/bench.md (+ .json): defences vs peers, harden time vs the paper's
# schedule, latency of hardened and MMDF models; then the folded-bounds latency table; then
# bench-results/real.md (+ .json): harden/detect/scan wall time and peak RSS on the real-size
# tier against the targets (builds the missing models first, see zoo-real); then
# bench-results/cost.md: harden's cost against parameters, input size and classes; then
# bench-results/dist.md: harden and scan under torchrun on 1 and 2 ranks (ResNet-18, 100 and 1,000 classes);
# then bench-results/mmdf.md: MMDF's ungated and focus-gated graphs against the original on clean traffic,
# and mmac-ft's model alone and served behind MMDF (detect --serve);
# then bench-results/peers.md: harden and detect beside fine-tuning, fine-pruning, CLP and ANP on the real tier.
bench: install
	$(PY) benchmarks/bench_defences.py --out bench-results
	$(PY) benchmarks/bench_latency.py --bounds bench-results/bounds
	$(PY) benchmarks/bench_real.py --out bench-results
	$(PY) benchmarks/bench_cost.py --out bench-results
	$(PY) benchmarks/bench_batching.py --out bench-results
	$(PY) benchmarks/bench_dist.py --out bench-results
	$(PY) benchmarks/bench_mmdf.py --real --serve --out bench-results
	THREADS=1 $(PY) benchmarks/bench_peers.py --out bench-results

# bench-results/seeds/seeds.md: harden and detect at their defaults on the real tier for seeds 0, 1
# and 2 (about 5 h on two cores, mmac-ft and the stack included; models that are not built are built first).
bench-seeds: install
	for s in 0 1 2; do THREADS=1 $(PY) benchmarks/bench_peers.py --defences none,mmac,mmac-ft,mmdf,mmac-ft+mmdf --seed $$s \
		--out bench-results/seeds/seed$$s || exit 1; done
	$(PY) benchmarks/seeds_table.py bench-results/seeds/seed0 bench-results/seeds/seed1 bench-results/seeds/seed2

eval-defence: install
	$(PY) benchmarks/evaluate.py --oracle --detect --report bench-results

lint: install
	$(VENV)/bin/ruff check mmexport tests sample_models benchmarks

clean:
	rm -rf build bench-results .pytest_cache .ruff_cache *.egg-info
