# Peer tool set-up for the benchmarks (sourced, not run): a throwaway virtualenv with
# llm-compressor (PyPI `llmcompressor`) and torch, installed from PyPI only, under
# target/venv-llmc (ignored by git, outside the repo's tracked files).
#   PEER_VENV (default $ROOT/target/venv-llmc), LLMC_VERSION (default 0.14.0.1).
# Needs ROOT (lib.sh sets it); works on its own from the repo root too.
#
# Torch: PyPI's Linux x86_64 torch wheel depends on the CUDA runtime wheels (nvidia-*,
# several GB). PyPI has no CPU-only torch wheel (those live on the PyTorch index, which
# this machine cannot reach), and the CUDA-built wheel does not import without its
# nvidia-* libraries, so we take what pip gives and check the disk first (~8 GB).
PEER_VENV="${PEER_VENV:-${ROOT:-$(pwd)}/target/venv-llmc}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"

# peer_venv: create (once) the venv and install llmcompressor; sets PEER_PY to its python.
# A venv that already imports llmcompressor at LLMC_VERSION is reused as it is.
peer_venv() {
    PEER_PY="$PEER_VENV/bin/python"
    if [[ -x "$PEER_PY" ]] && "$PEER_PY" -c "import llmcompressor,sys;sys.exit(llmcompressor.__version__!='$LLMC_VERSION')" >/dev/null 2>&1; then
        return 0
    fi
    local avail
    avail=$(df -Pk "$(dirname "$PEER_VENV")" | awk 'NR==2{print int($4/1048576)}')
    if (( avail < 10 )); then
        echo "error: only ${avail} GiB free for $PEER_VENV (torch with its CUDA wheels needs ~8 GiB)" >&2
        return 1
    fi
    mkdir -p "$(dirname "$PEER_VENV")"
    python3 -m venv "$PEER_VENV"
    "$PEER_PY" -m pip install --quiet --upgrade pip >&2
    # One resolve so pip picks the torch / transformers that llmcompressor pins.
    "$PEER_PY" -m pip install --quiet "llmcompressor==$LLMC_VERSION" >&2
    "$PEER_PY" -c "import llmcompressor" || { echo "error: llmcompressor does not import in $PEER_VENV" >&2; return 1; }
}

# peer_versions: one line with the versions in the peer venv.
peer_versions() {
    "$PEER_PY" -c "import llmcompressor,compressed_tensors,torch,transformers,datasets;print('llmcompressor %s, compressed-tensors %s, torch %s, transformers %s, datasets %s'%(llmcompressor.__version__,compressed_tensors.__version__,torch.__version__,transformers.__version__,datasets.__version__))" 2>/dev/null | tail -1
}
