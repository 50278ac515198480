#!/usr/bin/env bash
# Divergence of students from the SmolLM2-135M-Instruct teacher (Q4_1 GGUF, computed in f32):
# the teacher against itself, our GGUF exports (q8_0, q4_0, q4_k_m; plain rounding) and the
# RTN W4 g128 dense student, on wiki.test.raw with ctx 512 and CHUNKS chunks (second half of
# each chunk scored, as llama.cpp's --kl-divergence). Prints a markdown table.
set -euo pipefail
OUT="${OUT:-/tmp/kld-bench}"
source "$(dirname "$0")/lib.sh"
T="$MODEL"
for ty in q8_0 q4_0 q4_k_m; do "$BIN" convert "$T" "$OUT/$ty.gguf" --type "$ty" --force >/dev/null; done
"$BIN" quant "$T" --method rtn --bits 4 --group 128 --format dense --out "$OUT/rtn-w4g128" --force >/dev/null
echo "| student | bytes | bpw | ppl ± se | KLD mean ± se | median | p99 | same top % | RMS Δp % |"
echo "|---|---|---|---|---|---|---|---|---|"
for s in "$T" "$OUT/q8_0.gguf" "$OUT/q4_0.gguf" "$OUT/q4_k_m.gguf" "$OUT/rtn-w4g128"; do
    "$BIN" eval "$s" --teacher "$T" --ppl "$TEXT" --ctx 512 --chunks "$CHUNKS" --force --json "$OUT/r.json" >/dev/null
    python3 - "$s" "$OUT/r.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[2])); k = d["kld"]; p = d["perplexity"]; z = d["size"]
print(f"| {sys.argv[1]} | {z['bytes']} | {z['bits_per_weight']:.3f} | {p['value']:.4f} ± {p['stderr']:.4f} | {k['mean']:.6f} ± {k['stderr']:.6f} | {k['median']:.6f} | {k['p99']:.6f} | {k['top1_agreement']:.2f} | {k['rms_delta_p']:.3f} |")
PY
done
