#!/usr/bin/env bash
# The one test command (CI runs it through .ci/run).
#
# 1. Fetch the SmolLM2 model. Under CI (CI=true) a model that cannot be obtained is a
#    failure; locally the tests that need it skip themselves and say so loudly.
# 2. Check the committed GGUF test fixtures against their generator, with PyPI's gguf in a
#    virtualenv under target/ (never the user's own Python); under CI a failed install fails.
# 3. Run the workspace tests in the release profile: the same build `scripts/quickstart.sh`
#    and the benchmarks use, so the dependency tree is compiled once.
# 4. Print one closing line: N passed, N failed, N skipped (summed over every test binary).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
IN_CI=0
[[ "${CI:-}" == true || "${CI:-}" == 1 ]] && IN_CI=1

if ! bash scripts/get-smollm2.sh; then
    if [[ $IN_CI == 1 ]]; then
        echo "error: the SmolLM2 model could not be obtained (scripts/get-smollm2.sh); CI needs it" >&2
        exit 1
    fi
    echo "WARNING: SmolLM2 model unavailable; the tests that need it will SKIP"
fi

VENV="$ROOT/target/venv-test"
GEN=scripts/gen_gguf_fixtures.py
if command -v python3 >/dev/null 2>&1 && [[ -f "$GEN" ]] && grep -q -- '--check' "$GEN"; then
    if { [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"; } &&
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check gguf==0.19.0 numpy >/dev/null 2>&1; then
        echo "== fixtures: $GEN --check (PyPI gguf in $VENV)"
        "$VENV/bin/python" "$GEN" --check
    elif [[ $IN_CI == 1 ]]; then
        echo "error: could not install PyPI gguf into $VENV for the fixture check" >&2
        exit 1
    else
        echo "WARNING: PyPI gguf unavailable; the fixture check SKIPS"
    fi
fi

LOG="$ROOT/target/test-output.log"
mkdir -p target
export COMPRESS_SKIP_LOG="$ROOT/target/test-skips.log"
: >"$COMPRESS_SKIP_LOG"
echo "== cargo test --release --workspace"
set +e
cargo test --release --workspace 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e

# Interop: the converted HF folder reproduces the GGUF's perplexity (transformers' own load
# check needs a 2.8 GB torch download; run it with CHECK_HF=1).
if [[ $rc == 0 && -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
    echo "== scripts/check_convert.sh"
    if [[ "${CHECK_HF:-0}" == 1 ]]; then bash scripts/check_convert.sh; else SKIP_HF=1 bash scripts/check_convert.sh; fi
    # HF PEFT loads LoRA adapters written by compress distill (needs the same torch venv).
    if [[ "${CHECK_HF:-0}" == 1 ]]; then bash scripts/check_peft.sh; fi
fi

# Totals over every test binary; a test that skipped wrote a line to COMPRESS_SKIP_LOG.
read -r passed failed < <(awk '/^test result:/ {for (i=1;i<=NF;i++) {if ($(i+1) ~ /^passed/) p+=$i; if ($(i+1) ~ /^failed/) f+=$i}} END {print p+0, f+0}' "$LOG")
skipped=$(grep -c '^SKIP' "$COMPRESS_SKIP_LOG" || true)
[[ $skipped == 0 ]] || cat "$COMPRESS_SKIP_LOG"
echo "tests: $passed passed, $failed failed, $skipped skipped"
if [[ $IN_CI == 1 && $skipped -gt 0 ]]; then
    echo "error: $skipped tests skipped under CI (a model or tool is missing)" >&2
    exit 1
fi
exit "$rc"
