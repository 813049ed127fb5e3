#!/usr/bin/env bash
# GPU smoke test: what a user with an NVIDIA GPU runs to get TensorRT engines and GPU latency figures.
#
#   scripts/setup.sh            # once: .venv, compress, demo assets
#   scripts/gpu_smoke.sh        # this script
#
# 1. checks the driver (nvidia-smi);
# 2. swaps ONNX Runtime for its GPU build and installs TensorRT into .venv (the `gpu` and `tensorrt`
#    extras of pyproject.toml). onnxruntime and onnxruntime-gpu both install the Python package
#    `onnxruntime` and overwrite each other's files: they must never be installed together, so the CPU
#    wheel is uninstalled first;
# 3. runs pipelines/mobilenetv2-fashion-int8.yaml as shipped (ONNX Runtime on CPU; its optional engine
#    stage now builds), then a GPU variant generated into runs/gpu-smoke/: engine stages required (INT8
#    from the TensorRT-ready Q/DQ graph, FP16 from the FP32 ONNX) and `bench.onnx_providers: [cuda]`;
# 4. prints both latency tables (`compress inspect RUN --table latency`).
# The causal-lm pipelines have no GPU path yet (no TensorRT KV-cache session), so they are not run.
#
# Environment: TORCH_INDEX_URL (the package index of a CUDA build of torch) reinstalls torch from that
# index when the installed torch cannot see the GPU (the TensorRT runner uses torch.cuda for buffers).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)
CPU_PIPELINE=pipelines/mobilenetv2-fashion-int8.yaml
CPU_NAME=mobilenetv2-fashion-int8
GPU_NAME=$CPU_NAME-gpu
GPU_PIPELINE=runs/gpu-smoke/$GPU_NAME.yaml

say() { printf 'gpu_smoke: %s\n' "$*"; }
die() { printf 'gpu_smoke: error: %s\n' "$*" >&2; exit 1; }

# -- 1. the driver ---------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: install the NVIDIA driver first"
nvidia-smi -L | grep -q '^GPU ' || die "nvidia-smi lists no GPU: $(nvidia-smi -L 2>&1 | head -n 1)"
say "GPU(s): $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | paste -sd ';' -)"
[ -x "$PY" ] || die "no .venv: run scripts/setup.sh first"

# -- 2. the GPU extras ---------------------------------------------------------------------------
# `pip install -e '.[gpu,tensorrt]'` would also reinstall the CPU `onnxruntime`, a core dependency, next to
# onnxruntime-gpu; so the extras' requirements are read from pyproject.toml and installed on their own.
mapfile -t EXTRAS < <("$PY" - <<'EOF'
import tomllib

with open("pyproject.toml", "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
print("\n".join(extras["gpu"] + extras["tensorrt"]))
EOF
)
if "${PIP[@]}" show onnxruntime >/dev/null 2>&1; then
  say "uninstalling onnxruntime (CPU wheel): it must not be installed beside onnxruntime-gpu"
  "${PIP[@]}" uninstall --yes --quiet onnxruntime
fi
say "installing ${EXTRAS[*]}"
"${PIP[@]}" install --quiet "${EXTRAS[@]}"
if "${PIP[@]}" show onnxruntime >/dev/null 2>&1; then
  die "onnxruntime (CPU) came back beside onnxruntime-gpu; uninstall both, then install onnxruntime-gpu alone"
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
    say "reinstalling torch $version from $TORCH_INDEX_URL (the installed build cannot see the GPU)"
    "${PIP[@]}" install --quiet --force-reinstall "torch==$version" --index-url "$TORCH_INDEX_URL"
  else
    die "torch cannot see the GPU (a CPU build?). Rerun with TORCH_INDEX_URL=<index of a CUDA torch build> \
(the CUDA version your driver supports, see nvidia-smi)"
  fi
fi
"$PY" - <<'EOF'
import onnxruntime as ort
import tensorrt
import torch

from compress.gpu.availability import gpu_status

providers = ort.get_available_providers()
print(f"gpu_smoke: onnxruntime {ort.__version__} providers {providers}")
print(f"gpu_smoke: tensorrt {tensorrt.__version__}; torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
for need in ("tensorrt", "onnxruntime-gpu"):
    status = gpu_status(need)
    if not status.available:
        raise SystemExit(f"gpu_smoke: error: {need}: {status.reason}")
EOF

# -- 3. the runs ----------------------------------------------------------------------------------
mkdir -p runs/gpu-smoke
"$PY" - "$CPU_PIPELINE" "$GPU_PIPELINE" "$GPU_NAME" <<'EOF'
"""The GPU variant of the default pipeline: engines required, ONNX artifacts on the CUDA provider."""
import sys

import yaml

source, target, name = sys.argv[1:]
with open(source) as f:
    cfg = yaml.safe_load(f)
cfg["name"] = name
stages = []
for stage in cfg["stages"]:
    (kind, options), = stage.items()
    if kind == "engine":
        options = {**options, "optional": False}
    stages.append({kind: options})
stages.append({"engine": {"backend": "tensorrt", "precision": "fp16", "input": "onnx-fp32", "name": "engine-fp16"}})
cfg["stages"] = stages
cfg["bench"] = {**cfg.get("bench", {}), "onnx_providers": ["cuda"]}
# The speed gates compare CPU figures; on a GPU only the accuracy gate means the same thing.
cfg["gates"] = {k: v for k, v in cfg.get("gates", {}).items() if k == "top1_drop_max"}
with open(target, "w") as f:
    f.write(f"# generated by scripts/gpu_smoke.sh from {source}\n")
    yaml.safe_dump(cfg, f, sort_keys=False)
EOF
say "wrote $GPU_PIPELINE"

status=0
say "run 1/2: $CPU_PIPELINE (ONNX Runtime on CPU)"
.venv/bin/compress run "$CPU_PIPELINE" || status=$?
# Same stages, same cache keys: start the GPU run from the CPU run's artifacts instead of re-training.
if [ -d "runs/$CPU_NAME" ] && [ ! -d "runs/$GPU_NAME" ]; then
  cp -a "runs/$CPU_NAME" "runs/$GPU_NAME"
  rm -f "runs/$GPU_NAME/manifest.json" "runs/$GPU_NAME/report.md"
fi
say "run 2/2: $GPU_PIPELINE (engines required, ONNX Runtime CUDA provider; accuracy re-measured)"
.venv/bin/compress run "$GPU_PIPELINE" --force eval || status=$?

# -- 4. the tables ---------------------------------------------------------------------------------
for run in "runs/$CPU_NAME" "runs/$GPU_NAME"; do
  echo
  echo "== $run =="
  if [ -f "$run/manifest.json" ]; then
    .venv/bin/compress inspect "$run" --table latency
  else
    echo "(no manifest: the run failed before its report, see above)"
  fi
done
if [ -f "runs/$GPU_NAME/manifest.json" ] && ! grep -q '"backend": "onnxruntime-cuda"' "runs/$GPU_NAME/manifest.json"; then
  say "warning: no ONNX artifact of the GPU run was benchmarked on onnxruntime-cuda"
fi
echo
say "reports: runs/$CPU_NAME/report.md, runs/$GPU_NAME/report.md (exit status $status)"
exit "$status"
