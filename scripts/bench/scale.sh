#!/usr/bin/env bash
# Scaling benchmark: for each model shape, write a synthetic random bf16
# checkpoint (cargo example `synth`), run a short perplexity eval on it and
# print one markdown row: params, bytes on disk, wall time, tok/s, peak RSS.
# Perplexity of random weights is meaningless; this measures load + compute.
#
# Env: SHAPES (default "0.5b 1.5b 3b 7b"), CHUNKS (default 2), CTX (default
# 512), TMPDIR (where checkpoints go, default /tmp), COMPRESS_DATA (the
# data folder, see scripts/data-dir.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

source scripts/data-dir.sh
need_data wikitext-2-raw/wiki.test.raw
TEXT="$COMPRESS_DATA/wikitext-2-raw/wiki.test.raw"
SHAPES=${SHAPES:-0.5b 1.5b 3b 7b}
CHUNKS=${CHUNKS:-2}
CTX=${CTX:-512}

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

# Rough bf16 checkpoint size per shape in GiB (rounded up), for the
# free-space check only; the real size is measured after writing.
est_gib() {
    case "$1" in
        0.5b) echo 1 ;;
        1.5b) echo 3 ;;
        3b) echo 7 ;;
        7b) echo 15 ;;
        *) echo 16 ;;
    esac
}

cargo build --release -p compress
cargo build --release -p model --example synth

# One temp root for all checkpoints; removed on any exit.
TMPROOT=$(mktemp -d "${TMPDIR:-/tmp}/bench-scale.XXXXXX")
trap 'rm -rf "$TMPROOT"' EXIT

HEADER="| shape | params | bytes on disk | wall s | tok/s | peak RSS MiB |
|---|---|---|---|---|---|"
ROWS=""
STATUS=0

for shape in $SHAPES; do
    need_kb=$(( $(est_gib "$shape") * 2 * 1024 * 1024 ))
    free_kb=$(df -Pk "$TMPROOT" | awk 'NR==2 {print $4}')
    if (( free_kb < need_kb )); then
        echo "skip $shape: needs ~$(( need_kb / 1024 / 1024 )) GiB free in $TMPROOT, have $(( free_kb / 1024 / 1024 )) GiB" >&2
        ROWS+="| $shape | skipped: not enough disk | | | | |"$'\n'
        continue
    fi

    dir="$TMPROOT/$shape"
    echo "== $shape: writing synthetic bf16 checkpoint to $dir" >&2
    if ! cargo run --release -q -p model --example synth -- --shape "$shape" --dtype bf16 "$dir"; then
        echo "error: synth failed for $shape" >&2
        ROWS+="| $shape | synth failed | | | | |"$'\n'
        STATUS=1; rm -rf "$dir"; continue
    fi
    bytes=$(du -sb "$dir" | cut -f1)

    echo "== $shape: eval (ctx $CTX, $CHUNKS chunks)" >&2
    json="$TMPROOT/$shape.json"; timing="$TMPROOT/$shape.time"
    if ! /usr/bin/time -v -o "$timing" target/release/compress eval "$dir" \
            --ppl "$TEXT" --ctx "$CTX" --chunks "$CHUNKS" --force --json "$json"; then
        echo "error: eval failed for $shape (see above; killed for memory?)" >&2
        ROWS+="| $shape | eval failed | $bytes | | | |"$'\n'
        STATUS=1; rm -rf "$dir"; continue
    fi
    rm -rf "$dir"  # checkpoints are up to ~15 GB: drop each right away

    row=$(python3 - "$shape" "$bytes" "$json" "$timing" <<'PY'
import json, re, sys

shape, nbytes, report, timing = sys.argv[1:]
r = json.load(open(report))
t = open(timing).read()
rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
el = re.search(r"Elapsed \(wall clock\) time.*?: ([\d:.]+)", t).group(1)
wall = 0.0
for part in el.split(":"):  # h:mm:ss or m:ss.ss
    wall = wall * 60 + float(part)
print(f'| {shape} | {r["size"]["params"]:,} | {int(nbytes):,} | {wall:.2f} '
      f'| {r["speed"]["tokens_per_second"]:.1f} | {rss_kb / 1024:.0f} |')
PY
)
    echo "$row"
    ROWS+="$row"$'\n'
done

# Full table at the end (eval progress output may have interleaved above).
echo
echo "scale: $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo -), nproc $(nproc), ctx $CTX, chunks $CHUNKS"
echo "$HEADER"
printf '%s' "$ROWS"
exit "$STATUS"
