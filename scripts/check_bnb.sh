#!/usr/bin/env bash
# Load a `compress quant --scheme nf4|fp4 --format dense,bnb` output with HF transformers +
# bitsandbytes on the CPU and compare it with the dense model (see scripts/check_bnb.py).
#
# Usage: scripts/check_bnb.sh DIR [BNB_DIR] [--teacher HF_F32_DIR] [--tokens N]  (BNB_DIR: DIR/bnb)
#
# Uses a throwaway venv at ${VENV:-target/venv-bnb}. When it is missing it is made: if
# target/venv-llmc exists (torch + transformers + accelerate), the new venv sees its packages
# through a .pth file and only bitsandbytes is installed (--no-deps); otherwise torch,
# transformers, accelerate, safetensors and bitsandbytes are pip-installed from PyPI.
# Exits non-zero with the reason when bitsandbytes cannot run on this machine.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
VENV="${VENV:-target/venv-bnb}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac
BNB_SPEC="${BNB_SPEC:-bitsandbytes==0.50.2}"

if [ $# -lt 1 ]; then
    sed -n '2,6p' "$0" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "check_bnb: creating $VENV" >&2
    python3 -m venv "$VENV"
    BASE="$REPO_ROOT/target/venv-llmc"
    if [ -x "$BASE/bin/python" ]; then
        SP="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        BASE_SP="$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        echo "$BASE_SP" > "$SP/venv-llmc.pth"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps "$BNB_SPEC"
    else
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
            torch transformers accelerate safetensors "$BNB_SPEC"
    fi
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, transformers, accelerate, safetensors" 2>/dev/null; then
    echo "check_bnb: $VENV lacks torch/transformers/accelerate/safetensors (remove it to rebuild)" >&2
    exit 2
fi
if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    echo "check_bnb: pip install $BNB_SPEC into $VENV" >&2
    "$PY" -m pip install --disable-pip-version-check -q --no-deps "$BNB_SPEC"
fi
exec "$PY" "$SCRIPT_DIR/check_bnb.py" "$@"
