#!/usr/bin/env bash
# CUDA checks for a lent GPU machine with no package index (see docs/experiments.md, "GPU"):
# the test suite with its CUDA tests, harden on cuda vs cpu (time, result, same-seed repeat).
# Missing packages travel as wheels in .whl/ (onnx-graphsurgeon is not in that image).
# Usage: OUT=dir [QUICK=1: CUDA tests only, search on cuda only] bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nproc
    python3 -c "import torch, onnx, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'onnx', onnx.__version__, 'onnxruntime', o.__version__, o.get_available_providers())"
} 2>&1 | tee "$OUT/machine.txt"

if [ -n "${QUICK:-}" ]; then
    echo "== CUDA tests"
    python3 -m pytest -q -p no:cacheprovider -rs -k cuda tests/test_harden.py tests/test_engine_models.py 2>&1 |
        tail -15 | tee "$OUT/pytest.txt"
else
    echo "== test suite (CUDA tests included)"
    python3 -m pytest -q -n 8 -p no:cacheprovider -rs 2>&1 | tail -25 | tee "$OUT/pytest.txt"
fi

echo "== harden on cuda vs cpu"
DEVICES=${QUICK:+cuda,cuda} python3 - <<'EOF' 2>&1 | tee "$OUT/harden-cuda.txt"
import os
import time
import numpy as np
import torch
from mmexport.pipeline import harden
from mmexport.data import load_npz
from mmexport.runtime import validate

torch.set_num_threads(4)
for name in ("digits-cnn-badnet", "digits-cnn-wide-badnet", "digits-resnet-badnet"):
    f = f"sample_models/{name}"
    test, attack = load_npz(f"{f}/test.npz"), load_npz(f"{f}/attack.npz", attack=True)
    runs = {}
    for dev in (os.environ.get("DEVICES") or "cpu,cuda,cuda").split(","):
        t = time.perf_counter()
        res = harden(f"{f}/model.onnx", f"{f}/clean.npz", device=dev, seed=0)
        s = time.perf_counter() - t
        rep = validate(res.model, test, attack=attack, provider="cpu")
        b = np.concatenate([v.ravel() for v in res.bounds.values.values()])
        if dev in runs:
            same = np.array_equal(runs[dev], b)
            print(f"{name} {dev} repeat: identical bounds {same}, max abs diff {np.abs(runs[dev] - b).max():.3g}")
        else:
            runs[dev] = b
        print(f"{name} {dev}: {s:.1f}s epochs {res.report.epochs} ACC {100 * rep.accuracy:.1f} "
              f"ASR {100 * rep.asr:.1f}", flush=True)
    if "cpu" in runs:
        print(f"{name} cpu vs cuda bounds: max abs diff {np.abs(runs['cpu'] - runs['cuda']).max():.3g}")
EOF
