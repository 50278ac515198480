#!/usr/bin/env bash
# Decompress a compressed-tensors `sparse-bitmask` folder (prune::sparse::write_sparse_bitmask,
# `compress prune --format dense,sparse`) with compressed-tensors and compare it with the dense
# model it was written from (see scripts/check_sparse.py).
#
# Usage: scripts/check_sparse.sh DENSE_DIR [SPARSE_DIR]      (SPARSE_DIR defaults to DENSE_DIR/sparse)
#
# Synthetic pairs without a real model: `SPARSE_CHECK_DIR=DIR cargo test --release -p prune
# --test sparse` leaves DIR/<case>/{dense,sparse} (bf16 unstructured, f32 2:4 with biases).
#
# Reuses the venv at ${VENV:-.venv-hf} (relative paths are taken from the repo root; make it
# with scripts/check_hf_load.sh, which installs torch and transformers). compressed-tensors
# dropped its sparse compressors after 0.14 (0.15 and later parse a sparsity_config but cannot
# decompress one), so ${CT_SPEC:-compressed-tensors==0.14.0.1} is installed without
# dependencies into $VENV/ct-0.14 and put first on PYTHONPATH; it only needs torch, pydantic,
# loguru and transformers (which it imports; it declares transformers<5 but works with the
# venv's 5.x for this), so those are pip-installed into the venv if missing.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
VENV="${VENV:-.venv-hf}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac
CT_SPEC="${CT_SPEC:-compressed-tensors==0.14.0.1}"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    sed -n '6,6p' "$0" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "check_sparse: no venv at $VENV (create it with scripts/check_hf_load.sh --selftest, or set VENV)" >&2
    exit 2
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, safetensors" 2>/dev/null; then
    echo "check_sparse: $VENV lacks torch/safetensors (run scripts/check_hf_load.sh --selftest first)" >&2
    exit 2
fi
if ! "$PY" -c "import transformers, pydantic, loguru, numpy" 2>/dev/null; then
    echo "check_sparse: pip install transformers pydantic loguru numpy into $VENV" >&2
    "$PY" -m pip install --disable-pip-version-check -q transformers "pydantic>=2" loguru numpy
fi
CT_DIR="$VENV/ct-0.14"
if [ ! -f "$CT_DIR/compressed_tensors/compressors/sparse_compressors/sparse_bitmask.py" ]; then
    echo "check_sparse: pip install --no-deps $CT_SPEC into $CT_DIR" >&2
    "$PY" -m pip install --disable-pip-version-check -q --no-deps --target "$CT_DIR" "$CT_SPEC"
fi
export PYTHONPATH="$CT_DIR${PYTHONPATH:+:$PYTHONPATH}"

exec "$PY" "$SCRIPT_DIR/check_sparse.py" "$@"
