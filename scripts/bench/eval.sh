#!/usr/bin/env bash
# Perplexity + speed benchmark of SmolLM2-135M-Instruct Q4_1 on WikiText-2
# (raw test split), printed as one markdown row for BENCHMARKS.md.
#
# Env: CHUNKS (default 32), CTX (default 512), THREADS (optional, passed as
# --threads), COMPRESS_DATA (the data folder, see scripts/data-dir.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

source scripts/data-dir.sh
need_data wikitext-2-raw/wiki.test.raw
TEXT="$COMPRESS_DATA/wikitext-2-raw/wiki.test.raw"
CHUNKS=${CHUNKS:-32}
CTX=${CTX:-512}
GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf

command -v python3 >/dev/null 2>&1 || { echo "error: python3 is needed to read the reports" >&2; exit 1; }

# GNU time gives peak RSS; install it if missing (needs root and apt).
if [[ ! -x /usr/bin/time ]]; then
    echo "/usr/bin/time missing; installing the 'time' package" >&2
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1 \
        || ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time; } >&2; then
        echo "error: /usr/bin/time (GNU time) is required; install it with 'apt-get install time'" >&2
        exit 1
    fi
fi

cargo build --release -p compress
bash scripts/get-smollm2.sh

TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-eval.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

CMD=(target/release/compress eval "$GGUF" --ppl "$TEXT" --ctx "$CTX" --chunks "$CHUNKS")
[[ -n "${THREADS:-}" ]] && CMD+=(--threads "$THREADS")
CMD+=(--force --json "$TMP/eval.json")

/usr/bin/time -v -o "$TMP/time.txt" "${CMD[@]}"

# Markdown row: date, commit, nproc, tok/s, ppl, wall, peak RSS, command.
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "-")
CMDLINE=$(printf '%q ' "${CMD[@]}")
CMDLINE=${CMDLINE//"$ROOT/"/}  # show paths relative to the repo root
python3 - "$TMP/eval.json" "$TMP/time.txt" "$(date -u +%Y-%m-%d)" "$COMMIT" "$(nproc)" "${CMDLINE% }" <<'PY'
import json, re, sys

report, timing, date, commit, ncpu, cmd = sys.argv[1:]
r = json.load(open(report))
t = open(timing).read()

rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
el = re.search(r"Elapsed \(wall clock\) time.*?: ([\d:.]+)", t).group(1)
wall = 0.0
for part in el.split(":"):  # h:mm:ss or m:ss.ss
    wall = wall * 60 + float(part)

p, s = r["perplexity"], r["speed"]
print()
print("| date | commit | nproc | tok/s | ppl ± stderr | wall s | peak RSS MiB | command |")
print("|---|---|---|---|---|---|---|---|")
print(f'| {date} | {commit} | {ncpu} | {s["tokens_per_second"]:.1f} '
      f'| {p["value"]:.4f} ± {p["stderr"]:.4f} | {wall:.2f} | {rss_kb / 1024:.0f} | `{cmd}` |')
PY
