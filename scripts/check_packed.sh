#!/usr/bin/env bash
# Decompress a `compress quant --format dense,packed` output with compressed-tensors and
# compare it with the dense model (see scripts/check_packed.py).
#
# Usage: scripts/check_packed.sh DIR [PACKED_DIR]      (PACKED_DIR defaults to DIR/packed)
#
# Reuses the venv at ${VENV:-.venv-hf} (relative paths are taken from the repo root; make it
# with scripts/check_hf_load.sh, which installs torch and transformers) and pip-installs
# compressed-tensors (${CT_SPEC:-compressed-tensors==0.20.0}) into it if missing.
# compressed-tensors 0.19 dropped activation-order groups (actorder "group", weight_g_idx),
# so a packed model written with GPTQ --act-order is checked with compressed-tensors 0.18.0,
# installed without dependencies into $VENV/ct-0.18 and put first on PYTHONPATH.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
VENV="${VENV:-.venv-hf}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac
CT_SPEC="${CT_SPEC:-compressed-tensors==0.20.0}"
CT_LEGACY_SPEC="compressed-tensors==0.18.0"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    sed -n '2,6p' "$0" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "check_packed: no venv at $VENV (create it with scripts/check_hf_load.sh --selftest, or set VENV)" >&2
    exit 2
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, safetensors" 2>/dev/null; then
    echo "check_packed: $VENV lacks torch/safetensors (run scripts/check_hf_load.sh --selftest first)" >&2
    exit 2
fi
if ! "$PY" -c "import compressed_tensors" 2>/dev/null; then
    echo "check_packed: pip install $CT_SPEC into $VENV" >&2
    "$PY" -m pip install --disable-pip-version-check -q "$CT_SPEC"
fi

PACKED="${2:-$1/packed}"
if "$PY" - "$PACKED/config.json" <<'EOF'
import json, sys
qc = json.load(open(sys.argv[1])).get("quantization_config") or {}
groups = qc.get("config_groups", {}).values()
sys.exit(0 if any((g.get("weights") or {}).get("actorder") in ("group", "dynamic") for g in groups) else 1)
EOF
then
    LEGACY="$VENV/ct-0.18"
    if [ ! -f "$LEGACY/compressed_tensors/__init__.py" ]; then
        echo "check_packed: activation-order groups: pip install --no-deps $CT_LEGACY_SPEC into $LEGACY" >&2
        "$PY" -m pip install --disable-pip-version-check -q --no-deps --target "$LEGACY" "$CT_LEGACY_SPEC"
    fi
    export PYTHONPATH="$LEGACY${PYTHONPATH:+:$PYTHONPATH}"
fi

exec "$PY" "$SCRIPT_DIR/check_packed.py" "$@"
