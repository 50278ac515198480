#!/usr/bin/env bash
# Load a converted HF Llama folder with transformers (CPU) and optionally score perplexity.
#
# Usage: scripts/check_hf_load.sh MODEL_DIR [--text FILE] [--max-tokens N]
#        scripts/check_hf_load.sh --selftest        # tiny random model, no converter needed
#
# Creates/reuses a virtualenv at ${VENV:-.venv-hf} (relative paths are taken from the
# repo root; the venv ignores itself via its own .gitignore) and installs torch,
# transformers, safetensors and tokenizers from plain PyPI. PyPI only has CUDA builds of
# torch for Linux x86_64 (the CPU-only wheels live on download.pytorch.org, which is not
# reachable here), so the first install downloads ~2.8 GB (~1 min here) and the venv takes 5.6 GB on
# disk; the CUDA libraries are simply unused on a CPU-only machine. Later runs reuse it.
# Override versions with HF_PIP_SPECS="torch==... transformers==... ...".
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
VENV="${VENV:-.venv-hf}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac
# Versions this script was tested with.
HF_PIP_SPECS="${HF_PIP_SPECS:-torch==2.15.0 transformers==5.23.0 safetensors==0.8.0 tokenizers==0.23.3}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "check_hf_load: creating venv at $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    printf '*\n' > "$VENV/.gitignore"
fi
STAMP="$VENV/.check_hf_load-installed"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HF_PIP_SPECS" ]; then
    echo "check_hf_load: pip install $HF_PIP_SPECS (first time: ~2.8 GB download)" >&2
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q $HF_PIP_SPECS
    printf '%s' "$HF_PIP_SPECS" > "$STAMP"
fi

exec "$VENV/bin/python" "$SCRIPT_DIR/check_hf_load.py" "$@"
