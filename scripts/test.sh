#!/usr/bin/env bash
# The one test command (CI runs it through .ci/run).
#
# 1. Try to fetch the SmolLM2 model; a failure is not fatal, because the
#    integration tests that need it skip themselves with a printed note.
# 2. Check the committed GGUF test fixtures against their generator, if the
#    generator exists and supports --check.
# 3. Run the workspace tests in the dev profile (dependencies are built at
#    opt-level 2 by the workspace profile, so this is fast enough).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

if ! bash scripts/get-smollm2.sh; then
    echo "note: SmolLM2 model unavailable; tests that need it will be skipped"
fi

# The fixture check needs PyPI's gguf (small, pure Python); skip quietly if pip cannot get it.
python3 -m pip install -q --disable-pip-version-check gguf==0.19.0 numpy >/dev/null 2>&1 || true

GEN=scripts/gen_gguf_fixtures.py
if command -v python3 >/dev/null 2>&1 && [[ -f "$GEN" ]] && grep -q -- '--check' "$GEN"; then
    echo "== fixtures: python3 $GEN --check"
    python3 "$GEN" --check
fi

if command -v cargo-nextest >/dev/null 2>&1; then
    echo "== cargo nextest run --workspace"
    cargo nextest run --workspace
    echo "== cargo test --workspace --doc"
    cargo test --workspace --doc
else
    echo "== cargo test --workspace"
    cargo test --workspace
fi

# Interop: the converted HF folder reproduces the GGUF's perplexity (transformers' own load
# check needs a 2.8 GB torch download; run it with CHECK_HF=1).
if [[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
    echo "== scripts/check_convert.sh"
    if [[ "${CHECK_HF:-0}" == 1 ]]; then bash scripts/check_convert.sh; else SKIP_HF=1 bash scripts/check_convert.sh; fi
fi
