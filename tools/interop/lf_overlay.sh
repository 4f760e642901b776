#!/bin/sh
# usage: sh tools/interop/lf_overlay.sh [OVERLAY_DIR]   (default /tmp/lf-venv)
#
# An environment with LLaMA-Factory 0.9.5 and its pinned transformers (<= 5.6) / peft (<= 0.18.1),
# reusing emomerge's torch + torchvision by symlink (no second multi-GB torch download). Only the
# torch stack is shared: pointing a .pth at emomerge's whole site-packages also exposes newer
# packages LLaMA-Factory's transformers cannot import (kernels 0.x: "Either a revision or a
# version must be specified"). Never touches emomerge's venv. Not run in CI.
set -eu
LF_VERSION=0.9.5
OVERLAY=${1:-/tmp/lf-venv}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
MAIN_SP=$("$HERE/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
BASE_PY=$("$HERE/.venv/bin/python" -c "import sys; print(sys._base_executable)")

rm -rf "$OVERLAY"
"$BASE_PY" -m venv "$OVERLAY"
SP=$("$OVERLAY/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for entry in "$MAIN_SP"/torch "$MAIN_SP"/torch-*.dist-info "$MAIN_SP"/torchgen "$MAIN_SP"/functorch \
             "$MAIN_SP"/torchvision "$MAIN_SP"/torchvision-*.dist-info "$MAIN_SP"/torchvision.libs \
             "$MAIN_SP"/triton "$MAIN_SP"/triton-*.dist-info "$MAIN_SP"/nvidia "$MAIN_SP"/nvidia_*.dist-info \
             "$MAIN_SP"/cuda "$MAIN_SP"/cuda_*.dist-info; do
    [ -e "$entry" ] && ln -s "$entry" "$SP/"
done
PIP="$OVERLAY/bin/pip install -q --disable-pip-version-check"
$PIP --no-deps "llamafactory==$LF_VERSION"
# llamafactory's requirements minus torch/torchvision (linked above), torchaudio/torchdata (audio,
# streaming) and the web UI / API server (gradio, fastapi, uvicorn, sse-starlette, modelscope).
$PIP filelock typing-extensions setuptools sympy networkx jinja2 fsspec numpy pillow \
     "transformers>=4.55,<=5.6.0" "peft>=0.18.0,<=0.18.1" "accelerate>=1.3.0,<=1.11.0" \
     "datasets>=2.16.0,<=4.0.0" "trl>=0.18.0,<=0.24.0" "tyro<0.9.0" "av>=10,<=16.0.0" einops fire \
     omegaconf tiktoken sentencepiece protobuf scipy pandas matplotlib pyyaml safetensors packaging \
     pydantic
# LLaMA-Factory imports torchaudio at the top of data/mm_plugin.py (for audio samples only); PyPI
# has no torchaudio for torch 2.14 (latest 2.11.1, built against another torch ABI), so an
# importable stub stands in: any audio use fails loudly, images never touch it.
mkdir -p "$SP/torchaudio"
cat > "$SP/torchaudio/__init__.py" <<'PY'
"""Stub (emomerge tools/interop/lf_overlay.sh): no torchaudio build exists for this torch."""
def __getattr__(name):
    raise AttributeError(f"torchaudio stub: torchaudio.{name} is not available in this overlay")
PY
"$OVERLAY/bin/python" -c "import llamafactory, transformers, peft, torch; print('llamafactory', llamafactory.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'torch', torch.__version__)"
