#!/usr/bin/env bash
# PTQ side by side with llm-compressor (PyPI `llmcompressor`, in a throwaway virtualenv under
# target/venv-llmc: scripts/bench/peer_lib.sh) on SmolLM2-135M-Instruct, one run, the same
# calibration tokens: our `compress quant --dump-calib` writes the windows it drew (128 x 512
# from wiki.valid.tokens, seed 0) and llm-compressor calibrates on exactly those
# (scripts/bench/peer_quant.py). Rows: RTN, GPTQ (no act-order), GPTQ act-order (ours
# --act-order, theirs actorder "static") and AWQ, at W4 g64 asym and W4 g128 sym (576-wide
# inputs do not divide into groups of 128: llm-compressor refuses those rows, and the table
# says so). Both tools' students are scored by `compress eval` (wikitext-2 test, ctx 512,
# CHUNKS chunks, KLD from the teacher). CPU seconds are user+sys of each tool's process.
#   ROWS (space-separated globs of row keys, e.g. "gptq-*"; default all), OUT (default
#   /tmp/peers-bench), CALIB_SAMPLES (128), THREADS (default: all cores), RESUME (0: redo
#   everything; 1 keeps finished rows), PEER_CACHE (1: reuse a peer result measured on the
#   same windows, arguments, peer version and peer scripts; 0: run the peer again), BUILD,
#   COMPRESS_BIN.
# Writes OUT/rows.jsonl and OUT/table.md; the table names every peer row taken from the cache
# and when it was measured.
set -euo pipefail
OUT="${OUT:-/tmp/peers-bench}"
CALIB_SAMPLES="${CALIB_SAMPLES:-128}"
RESUME="${RESUME:-0}"
PEER_CACHE="${PEER_CACHE:-1}"
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/peer_lib.sh"
peer_venv
VERSIONS=$(peer_versions)
ROWS_FILE="$OUT/rows.jsonl"
[[ "$RESUME" == 1 ]] || rm -f "$ROWS_FILE"
touch "$ROWS_FILE"
say() { echo "[$(date +%T)] $*" >&2; }
THREADS_ARG=()
[[ -n "${THREADS:-}" ]] && THREADS_ARG=(--threads "$THREADS")

# The teacher as an f32 HF folder for transformers.
HF="$OUT/teacher-f32"
[[ -f "$HF/model.safetensors" ]] || "$BIN" convert "$MODEL" "$HF" --dtype f32 --force >/dev/null

# timed LOG CMD...: OUT/time gets "wall user sys maxrss_kib"; returns CMD's status.
timed() {
    local log=$1
    shift
    /usr/bin/time -f "%e %U %S %M" -o "$OUT/time" "$@" >"$log" 2>&1
}
# score MODEL -> JSON fields on one line: ppl, se, kld
score() {
    "$BIN" eval "$1" --teacher "$MODEL" --ppl "$TEXT" --ctx 512 --chunks "$CHUNKS" --force \
        --json "$OUT/eval.json" >"$OUT/eval.log" 2>&1 || { tail -3 "$OUT/eval.log" >&2; return 1; }
    python3 -c "import json;d=json.load(open('$OUT/eval.json'));print(json.dumps({'ppl':d['perplexity']['value'],'se':d['perplexity']['stderr'],'kld':d['kld']['mean'],'bytes':d['size']['bytes']}))"
}
cost() { python3 -c "w,u,s,m=open('$OUT/time').read().split();print('{\"wall_s\":%s,\"cpu_s\":%.2f,\"rss_mib\":%.1f}'%(w,float(u)+float(s),int(m)/1024))"; }

IDS="$OUT/calib-ids.json"
mkdir -p "$OUT/peer-cache"
# peer_hash: what the peer's row is a function of (its version, peer_quant.py, its arguments
# and the calibration windows' token ids, not where OUT is), so a cached row is only reused
# for the same inputs.
peer_hash() {
    {
        echo "$VERSIONS"
        cat "$ROOT/scripts/bench/peer_quant.py" "$ROOT/scripts/bench/peer_common.py"
        echo "${PEER[*]//"$OUT"/OUT}"
        if [[ " ${PEER[*]} " == *" --calib-ids "* ]]; then cat "$IDS"; fi
    } | sha256sum | cut -c1-16
}
# row CACHED CACHED_OR_FRESH: one line of rows.jsonl, our figures with the peer's from CACHED
# (a fresh row drops the measurement time, which the table only names for reused rows).
row() {
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));sys.argv[5]=='fresh' and d.pop('peer_measured');print(json.dumps({'key':sys.argv[2],'ours':json.loads(sys.argv[3]),'ours_cost':json.loads(sys.argv[4]),**d}))" \
        "$1" "$KEY" "$OS" "$OC" "$2" >>"$ROWS_FILE"
}
for KEY in rtn-g64-asym gptq-g64-asym gptqao-g64-asym awq-g64-asym rtn-g128-sym gptq-g128-sym gptqao-g128-sym awq-g128-sym; do
    want "$KEY" || continue
    [[ "$RESUME" == 1 ]] && grep -q "\"key\": \"$KEY\"" "$ROWS_FILE" && continue
    IFS=- read -r M G S <<<"$KEY"
    G=${G#g}
    OURS=(--method "${M/gptqao/gptq}" --bits 4 --group "$G")
    PEER=(--method "${M/gptqao/gptq}" --bits 4 --group "$G")
    [[ "$S" == sym ]] && { OURS+=(--sym); PEER+=(--sym); }
    [[ "$M" == gptqao ]] && { OURS+=(--act-order); PEER+=(--actorder static); }
    if [[ "$M" != rtn ]]; then
        OURS+=(--calib "$CALIB" --calib-samples "$CALIB_SAMPLES" --calib-len 512 --seed 0 --dump-calib "$IDS")
        PEER+=(--calib-ids "$IDS")
    fi
    say "$KEY: ours"
    if ! timed "$OUT/$KEY-ours.log" "$BIN" quant "$MODEL" "${OURS[@]}" "${THREADS_ARG[@]}" --format dense --out "$OUT/$KEY-ours" --force; then
        echo "error: ours failed ($OUT/$KEY-ours.log):" >&2; tail -3 "$OUT/$KEY-ours.log" >&2; exit 1
    fi
    OC=$(cost)
    OS=$(score "$OUT/$KEY-ours")
    CACHED="$OUT/peer-cache/$KEY-$(peer_hash).json"
    if [[ "$PEER_CACHE" == 1 && -s "$CACHED" ]]; then
        say "$KEY: llm-compressor's row from $CACHED (same windows, arguments and version)"
        row "$CACHED" cached
        continue
    fi
    say "$KEY: llm-compressor"
    if timed "$OUT/$KEY-peer.log" "$PEER_PY" "$ROOT/scripts/bench/peer_quant.py" --model "$HF" "${PEER[@]}" \
        ${THREADS:+--threads "$THREADS"} --out "$OUT/$KEY-peer"; then
        PC=$(cost)
        PS=$(score "$OUT/$KEY-peer")
    else
        # A refusal (e.g. a group that does not divide a width) is a row, not a failure.
        PC=null
        PS=$(python3 -c "import json,sys;print(json.dumps({'refused':sys.argv[1]}))" "$(grep -v '^\s*$' "$OUT/$KEY-peer.log" | tail -1 | cut -c1-160)")
    fi
    # Written whole, then renamed: an interrupted run leaves no partial cache entry.
    echo "{\"peer\": $PS, \"peer_cost\": $PC, \"peer_measured\": \"$(date -u +%FT%TZ)\"}" >"$CACHED.tmp"
    mv "$CACHED.tmp" "$CACHED"
    row "$CACHED" fresh
done

python3 - "$ROWS_FILE" "$OUT/table.md" "$VERSIONS" "$CHUNKS" "$CALIB_SAMPLES" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = [f"Ours (`compress quant`) against {sys.argv[3]}; SmolLM2-135M-Instruct, {sys.argv[5]} x 512 "
       f"calibration tokens (the same windows for both), wikitext-2 test ctx 512, {sys.argv[4]} chunks; "
       "KLD from the teacher.", "",
       "| method | ours ppl | peer ppl | ours KLD | peer KLD | ours CPU s | peer CPU s | ours RSS MiB | peer RSS MiB |",
       "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    o, p, oc, pc = r["ours"], r["peer"], r["ours_cost"], r["peer_cost"]
    if "refused" in p:
        out.append(f"| {r['key']} | {o['ppl']:.3f} ± {o['se']:.3f} | refused: {p['refused']} | {o['kld']:.5f} | - | {oc['cpu_s']:.0f} | - | {oc['rss_mib']:.0f} | - |")
    else:
        out.append(f"| {r['key']} | {o['ppl']:.3f} ± {o['se']:.3f} | {p['ppl']:.3f} ± {p['se']:.3f} | {o['kld']:.5f} | {p['kld']:.5f} | {oc['cpu_s']:.0f} | {pc['cpu_s']:.0f} | {oc['rss_mib']:.0f} | {pc['rss_mib']:.0f} |")
cached = [f"{r['key']} (measured {r['peer_measured']})" for r in rows if "peer_measured" in r]
if cached:
    out += ["", "Peer rows reused from an earlier run on the same windows, arguments and version: "
            + ", ".join(cached) + "."]
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print("\n".join(out))
EOF
