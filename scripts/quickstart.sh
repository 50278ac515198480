#!/usr/bin/env bash
# First run on a fresh machine: fetch SmolLM2-135M, build, inspect it,
# convert the GGUF to an HF folder, measure perplexity of both on
# WikiText-2 (raw test split) and print a small comparison table.
#
# Env: CHUNKS (default 8), CTX (default 512), DTYPE for convert (default
# f32, matching the llama.cpp reference which dequantizes Q4_1 to F32),
# COMPRESS_DATA (the data folder; see scripts/data-dir.sh). Without the
# WikiText-2 test file there, it is fetched with scripts/get-data.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

source scripts/data-dir.sh
TEXT="$COMPRESS_DATA/wikitext-2-raw/wiki.test.raw"
CHUNKS=${CHUNKS:-8}
CTX=${CTX:-512}
DTYPE=${DTYPE:-f32}
GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf
HF=models/smollm2-135m-hf
OUT=models/quickstart
BIN=target/release/compress

command -v python3 >/dev/null 2>&1 || { echo "error: python3 is needed to print the summary" >&2; exit 1; }
if [[ ! -f "$TEXT" ]]; then
    echo "== 0/5 data: $TEXT missing; fetching WikiText-2 into $COMPRESS_DATA"
    if ! bash scripts/get-data.sh --only wikitext "$COMPRESS_DATA"; then
        echo "error: could not fetch WikiText-2. Run scripts/get-data.sh DIR where the internet is reachable" >&2
        echo "(or get wikitext-2-raw/wiki.test.raw from https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip)," >&2
        echo "then: export COMPRESS_DATA=DIR" >&2
        exit 1
    fi
fi

echo "== 1/5 model"
bash scripts/get-smollm2.sh

echo "== 2/5 build (release)"
cargo build --release -p compress

echo "== 3/5 inspect $GGUF"
"$BIN" inspect "$GGUF"

echo "== 4/5 convert -> $HF ($DTYPE)"
"$BIN" convert "$GGUF" "$HF" --dtype "$DTYPE" --force

echo "== 5/5 perplexity (ctx $CTX, $CHUNKS chunks)"
mkdir -p "$OUT"
"$BIN" eval "$GGUF" --ppl "$TEXT" --ctx "$CTX" --chunks "$CHUNKS" --force --json "$OUT/gguf.json"
"$BIN" eval "$HF" --ppl "$TEXT" --ctx "$CTX" --chunks "$CHUNKS" --force --json "$OUT/hf.json"

# Summary table from the eval JSON reports (stdlib only).
echo
python3 - "$GGUF" "$OUT/gguf.json" "$HF" "$OUT/hf.json" <<'EOF'
import json, sys

args = sys.argv[1:]
rows = []
for name, path in zip(args[0::2], args[1::2]):
    with open(path) as f:
        r = json.load(f)
    p, s, z = r["perplexity"], r["speed"], r["size"]
    rows.append((
        name,
        f'{p["value"]:.3f} ± {p["stderr"]:.3f}',
        f'{s["tokens_per_second"]:.1f}',
        f'{z["bytes"]:,}',
    ))

head = ("model", "ppl ± stderr", "tok/s", "bytes")
w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
fmt = lambda r: "| " + " | ".join(str(c).ljust(n) for c, n in zip(r, w)) + " |"
print(fmt(head))
print("|" + "|".join("-" * (n + 2) for n in w) + "|")
for r in rows:
    print(fmt(r))
EOF
echo
echo "reports: $OUT/gguf.json $OUT/hf.json"
