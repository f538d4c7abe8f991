#!/usr/bin/env bash
# The GPU checks, as one command for a lent GPU machine (about 6-8 minutes on one H100/H200):
#   1. `maskopt search` on CUDA (fp32, then fp16) on the embedded default, short budget;
#   2. `maskopt export --onnx` of the fp32 masks and `maskopt generate` on torch/CUDA vs onnxruntime;
#   3. benchmarks/gpu_unet.py: SD1.5-shaped U-Net latency, baseline vs baked vs dropped, eager and compiled;
#   4. benchmarks/workers.py: --workers 4 and 8 (candidates per batch) against one at a time, on the GPU;
#   5. benchmarks/search_reuse.py: the default search (K=4), evaluations per minute with and without reuse.
# Usage: bash benchmarks/gpu_checks.sh OUT_DIR     (PYTHONPATH must reach maskopt, e.g. PYTHONPATH=.)
#        STEPS="workers reuse" bash benchmarks/gpu_checks.sh OUT_DIR    (some steps only: search unet workers reuse)
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
m="python3 -m maskopt.cli"
dev=${DEV:-cuda}  # DEV=cpu runs the same checks without a GPU (a dry run of this script)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, nevergrad; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'nevergrad', nevergrad.__version__)"
steps=" ${STEPS:-search unet workers reuse} "
step() { [[ "$steps" == *" $1 "* ]]; }
if step search; then
for dtype in ${DTYPES:-float32 float16}; do
  start=$(date +%s)
  $m search --device $dev --dtype "$dtype" --budget 40 --holdout-seeds 2 --out "$out/search-$dtype" || echo "search $dtype FAILED"
  echo "search $dtype: $(( $(date +%s) - start )) s"
done
$m export --masks "$out/search-float32/masks.json" --onnx --drop --out "$out/export" || echo "export FAILED"
g="--prompt 'a photo of the digit 3' --seed 7 --steps 15 --guidance 1.0"
eval $m generate $g --masks "$out/search-float32/masks.json" --backend torch --device $dev --out "$out/gen-torch.png" || echo "generate torch FAILED"
eval $m generate $g --export "$out/export" --backend onnxruntime --out "$out/gen-onnxruntime.png" || echo "generate onnxruntime FAILED"
python3 - "$out" <<'PY'
import sys, numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f"{sys.argv[1]}/gen-{k}.png"), dtype=np.float64) for k in ("torch", "onnxruntime"))
mse = ((a - b) ** 2).mean()
print("generate torch on CUDA vs onnxruntime (CPU provider): PSNR", "inf" if mse == 0 else f"{10 * np.log10(255 ** 2 / mse):.1f} dB")
PY
fi
[ "$dev" = cuda ] && step unet && python3 benchmarks/gpu_unet.py --budget 300
step workers && python3 benchmarks/workers.py --device $dev --workers 4 8 --candidates 32
step reuse && python3 benchmarks/search_reuse.py --device $dev --budget ${REUSE_BUDGET:-400}
true
