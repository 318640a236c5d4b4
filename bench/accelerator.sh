#!/usr/bin/env bash
# The accelerator figures in one run (about 7 minutes on one H100/H200, 8 at most): train images/s
# and MFU of the DDPM CIFAR-10 UNet (float32, bfloat16, with and without remat, global batch 128)
# and of DiT-B/2 and DiT-XL/2 in bfloat16 (ImageNet-256 latents), peak device memory, 256 samples
# with 1,000-step DDPM and 50-step DDIM, compile times. See bench/accelerator.py.
#
#   bash bench/accelerator.sh            # from the repository root; JSON to $OUT (default bench/results)
#
# Installs the package and JAX's CUDA 12 plugin into the current Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
JAX_VERSION="$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null || true)"
"$PY" -m pip install -q -e .
if [ -n "$JAX_VERSION" ]; then
  "$PY" -m pip install -q "jax[cuda12]==$JAX_VERSION"
else
  "$PY" -m pip install -q "jax[cuda12]"
fi
"$PY" -c 'import jax; print("devices:", jax.devices())'
# Each case runs in its own process (peak_bytes_in_use is that case's), for 2 minutes at most; no case
# starts after 5 minutes (the float32 DDPM sampling case is last), so the cases end within 7 minutes.
"$PY" bench/accelerator.py --out "$OUT/accelerator.json" --timeout 120 --budget 300 | tee "$OUT/accelerator.md"
