#!/usr/bin/env bash
# The GPU checks of issue 23 in one run, for a session lent a CUDA machine (docs/results.md, "GPU"): the CUDA tests,
# then the float64 and sound float32 bounds timed on the GPU (bench_certify: MLP 784-512-512-10 and the 1x28x28 CNN;
# bench_residual: the digits ResNet and ResNet-18). Everything lands in $OUT (else ./gpu-check): device.txt,
# tests.txt, certify_<dtype>.json, residual_<dtype>.txt, stderr.txt. About 5 minutes on an H100.
#
# The device machine has torch but not ART and no network: download ART's wheel here first, into a folder that git
# ignores, and carry it (`carry: [".whl"]`):
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: -d .whl adversarial-robustness-toolbox==1.20.1
# then run `bash benchmarks/gpu_check.sh` there. DEVICE=cpu runs the same script on a CPU (a dry run: the CUDA tests
# skip, the benchmarks time the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
device="${DEVICE:-cuda}"
mkdir -p "$out"
if ! python3 -c "import art" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python3 - <<'PY' 2>&1 | tee "$out/device.txt"
import torch, art
print("torch", torch.__version__, "ART", art.__version__, "CUDA", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.version.cuda)
PY
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_certification_linear.py \
    -k "cuda or gpu" -rs 2>&1 | tee "$out/tests.txt"
for dtype in float64 float32-rounding; do
    echo "bench_certify $dtype" | tee -a "$out/stderr.txt"
    timeout 120 python3 benchmarks/bench_certify.py --device "$device" --dtype "$dtype" --methods interval linear \
        --balls inf --repeats 5 >"$out/certify_$dtype.json" 2>>"$out/stderr.txt"
    echo "bench_residual $dtype" | tee -a "$out/stderr.txt"
    timeout 150 python3 benchmarks/bench_residual.py --device "$device" --dtype "$dtype" --skip-tightness \
        --repeats 5 >"$out/residual_$dtype.txt" 2>>"$out/stderr.txt"
done
tail -n 4 "$out"/residual_*.txt
