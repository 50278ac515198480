#!/usr/bin/env bash
# The full zero-shot task suite (every document of piqa, arc_easy, medqa, pubmedqa and the six
# medical MMLU subsets) on one model, default the SmolLM2-135M-Instruct teacher. Prints a
# markdown table with n and standard errors, and the wall time of the whole run.
#   scripts/bench/tasks.sh [MODEL]        LIMIT=100 for a quick run
set -euo pipefail
OUT="${OUT:-/tmp/tasks-bench}"
source "$(dirname "$0")/lib.sh"
M="${1:-$MODEL}"
LIMIT_ARGS=()
[ -n "${LIMIT:-}" ] && LIMIT_ARGS=(--limit "$LIMIT")
start=$(date +%s.%N)
"$BIN" eval "$M" --tasks piqa,arc_easy,medqa,pubmedqa,mmlu_medical --data-dir "$COMPRESS_DATA" \
    "${LIMIT_ARGS[@]}" --force --json "$OUT/tasks.json" >"$OUT/tasks.txt"
end=$(date +%s.%N)
python3 - "$OUT/tasks.json" "$start" "$end" "$M" "$(nproc)" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); t = d["tasks"]
print(f"model: {sys.argv[4]}")
print("| task | n | acc % ± se | acc_norm % ± se | seconds |")
print("|---|---|---|---|---|")
for name, r in t.items():
    print(f"| {name} | {r['n']} | {100*r['acc']:.2f} ± {100*r['acc_stderr']:.2f} | "
          f"{100*r['acc_norm']:.2f} ± {100*r['acc_norm_stderr']:.2f} | {r['seconds']:.0f} |")
print(f"wall time: {float(sys.argv[3]) - float(sys.argv[2]):.0f} s on {sys.argv[5]} cores")
PY
