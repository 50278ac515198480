#!/usr/bin/env bash
# Distillation benchmark on SmolLM2-135M-Instruct: the teacher's MLP channels pruned by 25%
# (structured, activation importance, wiki.valid.tokens calibration), then the pruned student
# trained on the same token budget and options:
#   kd    white-box KD, forward KL from the teacher's logits (lr 3e-4)
#   kdce  the same KD term plus cross-entropy on the data, weight 1 (Hinton's soft + hard
#         targets; lr 3e-4)
#   ce    plain cross-entropy fine-tuning on the data, no teacher (lr 3e-4)
#   kd-tc white-box KD as `kd`, from a corrected teacher (Minitron's "teacher correction",
#         Sreenivas et al. 2024: the teacher first fine-tuned with CE on the distillation data,
#         TC_TOKENS tokens, lr 3e-4, so it is not distilled out of its own domain; an Instruct
#         teacher scored on Wikipedia text is off its domain, which is why plain `ce` on
#         wiki.valid beats `kd` from the uncorrected teacher). The student's budget is the
#         same as every run's; the correction's own tokens are reported beside it.
#   kdce-tc  kdce from the corrected teacher (Hinton's soft + hard targets after teacher
#         correction; the run that beats `ce` on these tokens)
#   lora  KD into LoRA adapters, rank 16 on all seven linears of every block (lr 1e-3: LoRA
#         usually takes a higher rate than full training, its updates being low-rank)
#   qlora the same LoRA run on a frozen NF4 base (block 64; QLoRA): its peak RSS and
#         perplexity against lora's are issue 12's QLoRA check (RUNS="lora qlora")
#   qlora-loftq  qlora with LoftQ-started adapters (--lora-init loftq --loftq-iter 5)
#   qlora-loftq32  qlora-loftq on NF4 block 32 with double quantization (4.25 bits per weight)
# All: wiki.valid.tokens, seq 512, 2048 tokens per step, warmup 10%, cosine decay, seed 0.
# The teacher, the pruned student, every kept checkpoint and every final model are scored on
# wikitext-2 test (ctx 512, CHUNKS chunks); OUT/curve.csv holds
# run,tokens,perplexity,perplexity_se,recovered, where recovered = (pruned - ppl) / (pruned -
# teacher) is the share of the gap closed; rows `teacher` and `pruned` are the references and
# each run starts from the pruned student at tokens 0. eval's `curve` example plots it to
# OUT/curve.svg. Then the speed of one training step at seq 512 on THREADS threads, ours
# (`compress distill --loss ce`) against PyTorch (scripts/bench/torch_train_step.py in the
# peer venv of peer_lib.sh) on the same f32 HF copy of the teacher, appended to
# OUT/speed.json with the cores other jobs used meanwhile: run it on an idle machine, as
# PyTorch's OpenMP threads slow down several-fold when other jobs hold the cores (here at
# load ~5: 21-38 s a step on 2 threads, 5-8 s on 1). Prints a markdown summary (also
# OUT/summary.md).
#   TOKENS (default 98304 = 48 steps: about 30 min of KD at ~55 tok/s on the project's
#   2-core machine; the whole script takes about 3.5 h), SAVE_EVERY (default steps / 8: 7
#   checkpoints plus the final model per run), CHUNKS (default 32), OUT (default
#   /tmp/distill-bench), RUNS (default "kd kd-tc kdce kdce-tc ce lora"; *-tc first correct the teacher,
#   TC_TOKENS default 24576 = 12 steps), SPEED (default 1; 0 skips the speed
#   comparison), THREADS (default 2: the speed comparison's threads), NICE (default 0),
#   BUILD (default 1; 0 runs target/release/compress and target/release/examples/curve as
#   they are, see lib.sh), COMPRESS_BIN, RESUME (default 0; 1 keeps OUT and skips what is
#   done: the pruned student, finished runs, scores; a run cut short continues from its newest
#   checkpoint with --resume, its seconds then covering the last sitting only, as the summary
#   says), KEEP_STATE (default 0: a finished run's checkpoints lose their training state,
#   ~1.4 GB each for full training; the models stay).
# Smoke test: TOKENS=4096 SAVE_EVERY=1 CHUNKS=2 NICE=10 OUT=/tmp/distill-smoke scripts/bench/distill.sh
set -euo pipefail
OUT="${OUT:-/tmp/distill-bench}"
TOKENS="${TOKENS:-98304}"
RUNS="${RUNS:-kd kd-tc kdce kdce-tc ce lora}"
SPEED="${SPEED:-1}"
THREADS="${THREADS:-2}"
NICE="${NICE:-0}"
RESUME="${RESUME:-0}"
TC_TOKENS="${TC_TOKENS:-24576}"
KEEP_STATE="${KEEP_STATE:-0}"
SEQ=512
BATCH=2048
source "$(dirname "$0")/lib.sh"
HERE="$ROOT/scripts/bench"
TEACHER="$MODEL"
[[ -f "$TEACHER" ]] || { echo "error: teacher $TEACHER not found (scripts/get-smollm2.sh)" >&2; exit 1; }
STEPS=$(((TOKENS + BATCH - 1) / BATCH))
SAVE_EVERY="${SAVE_EVERY:-$((STEPS >= 16 ? STEPS / 8 : 1))}"
PRUNED="$OUT/pruned"
EVALS="$OUT/evals"
TIMES="$OUT/times"
if [[ "$RESUME" != 1 ]]; then
    rm -rf "$EVALS" "$TIMES"
fi
mkdir -p "$EVALS" "$TIMES"

say() { echo "[$(date +%T)] $*" >&2; }

# timed NAME LOG CMD...: runs CMD niced under /usr/bin/time, appending "wall user sys
# peak-RSS-KiB" to TIMES/NAME.times; on failure shows the end of LOG and stops the script.
timed() {
    local name=$1 log=$2
    shift 2
    if ! nice -n "$NICE" /usr/bin/time -f "%e %U %S %M" -o "$TIMES/$name.step" "$@" >"$log" 2>&1; then
        echo "error: $name failed ($log):" >&2
        grep -v '^[[:space:]]*$' "$log" | tail -5 >&2
        exit 1
    fi
    tail -1 "$TIMES/$name.step" >>"$TIMES/$name.times"
}

# score NAME MODEL: perplexity of MODEL into EVALS/NAME.json (kept under RESUME=1).
score() {
    local j="$EVALS/$1.json"
    [[ "$RESUME" == 1 && -s "$j" ]] && return 0
    say "eval $1"
    if ! nice -n "$NICE" "$BIN" eval "$2" --ppl "$TEXT" --ctx 512 --chunks "$CHUNKS" --force \
        --json "$j" >"$EVALS/$1.log" 2>&1; then
        echo "error: eval of $2 failed ($EVALS/$1.log):" >&2
        tail -5 "$EVALS/$1.log" >&2
        exit 1
    fi
}

# busy: jiffies all CPUs spent busy so far (user, nice, system, irq, softirq, steal).
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }

# tokens_of DIR: tokens trained, from the last line of DIR/train_log.jsonl.
tokens_of() {
    python3 -c "import json,sys;print([json.loads(l) for l in open(sys.argv[1]) if l.strip()][-1]['tokens'])" \
        "$1/train_log.jsonl"
}

# Disk: a full-training checkpoint is the f32 model plus AdamW state, about 1.9 GB here.
NCK=$(((STEPS - 1) / SAVE_EVERY))
NEED=$((NCK * 19 / 10 + 3))
FREE=$(df -Pk "$OUT" | awk 'NR==2{print int($4/1048576)}')
if ((FREE < NEED)); then
    echo "error: $OUT has $FREE GiB free; a run keeps $NCK checkpoints (~$NEED GiB): raise SAVE_EVERY" >&2
    exit 1
fi

# a. The pruned student.
if [[ "$RESUME" == 1 && -f "$PRUNED/prune_report.json" ]]; then
    say "pruned: done before (RESUME=1)"
else
    rm -f "$TIMES/prune.times"
    say "prune: MLP channels -25%"
    timed prune "$OUT/prune.log" "$BIN" prune "$TEACHER" --structured channels --ratio 0.25 \
        --calib "$CALIB" --out "$PRUNED" --force
fi

# a2. The corrected teacher, when a run distills from it.
TC="$OUT/teacher-tc"
if [[ " $RUNS " == *" kd-tc "* || " $RUNS " == *" kdce-tc "* ]]; then
    if [[ "$RESUME" == 1 && -f "$TC/distill_report.json" ]]; then
        say "teacher correction: done before (RESUME=1)"
    else
        rm -f "$TIMES/teacher-tc.times"
        say "teacher correction: CE on the data, $TC_TOKENS tokens"
        timed teacher-tc "$OUT/teacher-tc.log" "$BIN" distill --student "$TEACHER" --loss ce --lr 3e-4 \
            --data "$CALIB" --seq-len "$SEQ" --batch-tokens "$BATCH" --max-tokens "$TC_TOKENS" \
            --warmup 0.1 --seed 0 --out "$TC" --force
    fi
fi

# b. Training runs: one budget, one set of options.
COMMON=(--data "$CALIB" --seq-len "$SEQ" --batch-tokens "$BATCH" --max-tokens "$TOKENS"
    --warmup 0.1 --seed 0 --save-every "$SAVE_EVERY" --save-limit 0 --keep-checkpoints)
LORA_TARGETS=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
for R in $RUNS; do
    case "$R" in
    kd) RA=(--teacher "$TEACHER" --loss fkl --lr 3e-4) ;;
    kdce) RA=(--teacher "$TEACHER" --loss fkl --ce-weight 1 --lr 3e-4) ;;
    ce) RA=(--loss ce --lr 3e-4) ;;
    kd-tc) RA=(--teacher "$TC" --loss fkl --lr 3e-4) ;;
    kdce-tc) RA=(--teacher "$TC" --loss fkl --ce-weight 1 --lr 3e-4) ;;
    lora) RA=(--teacher "$TEACHER" --loss fkl --lora-rank 16 --lora-targets "$LORA_TARGETS" --lr 1e-3) ;;
    qlora) RA=(--teacher "$TEACHER" --loss fkl --lora-rank 16 --lora-targets "$LORA_TARGETS" --lr 1e-3
        --base-scheme nf4 --block 64) ;;
    qlora-loftq) RA=(--teacher "$TEACHER" --loss fkl --lora-rank 16 --lora-targets "$LORA_TARGETS"
        --lr 1e-3 --base-scheme nf4 --block 64 --lora-init loftq --loftq-iter 5) ;;
    qlora-loftq32) RA=(--teacher "$TEACHER" --loss fkl --lora-rank 16 --lora-targets "$LORA_TARGETS"
        --lr 1e-3 --base-scheme nf4 --block 32 --double-quant --lora-init loftq --loftq-iter 5) ;;
    *) echo "error: unknown run '$R' in RUNS (kd, kdce, ce, kd-tc, kdce-tc, lora, qlora, qlora-loftq, qlora-loftq32)" >&2; exit 1 ;;
    esac
    D="$OUT/$R"
    if [[ "$RESUME" == 1 && -f "$D/distill_report.json" ]]; then
        say "$R: done before (RESUME=1)"
        continue
    fi
    MODE=(--force)
    if [[ "$RESUME" == 1 ]] && compgen -G "$D.checkpoints/checkpoint-*/state" >/dev/null; then
        MODE=(--resume)
        touch "$TIMES/$R.resumed"
    else
        rm -f "$TIMES/$R.times" "$TIMES/$R.resumed"
    fi
    say "$R: $TOKENS tokens, checkpoint every $SAVE_EVERY steps ${MODE[*]}"
    timed "$R" "$OUT/$R.log" "$BIN" distill --student "$PRUNED" "${RA[@]}" "${COMMON[@]}" \
        --out "$D" "${MODE[@]}"
    grep '^distilled' "$OUT/$R.log" >&2 || true
    [[ "$KEEP_STATE" == 1 ]] || rm -rf "$D".checkpoints/checkpoint-*/state
done

# c. Scores: teacher, pruned, then each run's checkpoints and final model (run, tokens, eval).
score teacher "$TEACHER"
score pruned "$PRUNED"
POINTS="$OUT/points.tsv"
printf 'teacher\t0\tteacher\npruned\t0\tpruned\n' >"$POINTS"
if [[ " $RUNS " == *" kd-tc "* || " $RUNS " == *" kdce-tc "* ]]; then
    score teacher-tc "$TC"
    printf 'teacher-tc\t%s\tteacher-tc\n' "$(tokens_of "$TC")" >>"$POINTS"
fi
for R in $RUNS; do
    D="$OUT/$R"
    [[ -f "$D/distill_report.json" ]] || { echo "error: $D not finished" >&2; exit 1; }
    printf '%s\t0\tpruned\n' "$R" >>"$POINTS"
    for S in $(ls "$D.checkpoints" 2>/dev/null | sed -n 's/^checkpoint-\([0-9]*\)$/\1/p' | sort -n); do
        C="$D.checkpoints/checkpoint-$S"
        score "$R-$S" "$C"
        printf '%s\t%s\t%s\n' "$R" "$(tokens_of "$C")" "$R-$S" >>"$POINTS"
    done
    score "$R-final" "$D"
    printf '%s\t%s\t%s\n' "$R" "$(tokens_of "$D")" "$R-final" >>"$POINTS"
done
python3 - "$POINTS" "$EVALS" "$OUT/curve.csv" <<'EOF'
import json, sys
points, evals, out = sys.argv[1:]
ppl = {}
rows = []
for line in open(points):
    run, tokens, name = line.rstrip("\n").split("\t")
    if name not in ppl:
        p = json.load(open(f"{evals}/{name}.json"))["perplexity"]
        ppl[name] = (p["value"], p["stderr"])
    rows.append((run, int(tokens), *ppl[name]))
t, p = ppl["teacher"][0], ppl["pruned"][0]
with open(out, "w") as f:
    f.write("run,tokens,perplexity,perplexity_se,recovered\n")
    for run, tokens, v, se in rows:
        f.write(f"{run},{tokens},{v:.4f},{se:.4f},{(p - v) / (p - t):.4f}\n")
EOF
say "wrote $OUT/curve.csv"

# d. The curve.
if [[ "${BUILD:-1}" != 0 ]]; then
    nice -n "$NICE" cargo run --quiet --release -p eval --example curve -- "$OUT/curve.csv" "$OUT/curve.svg" >&2
elif [[ -x "$ROOT/target/release/examples/curve" ]]; then
    "$ROOT/target/release/examples/curve" "$OUT/curve.csv" "$OUT/curve.svg" >&2
else
    echo "warning: target/release/examples/curve not built (BUILD=0): no $OUT/curve.svg" >&2
fi

# e. Speed of one training step, ours against PyTorch, same weights, threads and window.
SPEED_MD=""
if [[ "$SPEED" != 0 ]]; then
    HF="$OUT/teacher-hf"
    if ! [[ "$RESUME" == 1 && -f "$HF/config.json" ]]; then
        "$BIN" convert "$TEACHER" "$HF" --dtype f32 --force >/dev/null
    fi
    source "$HERE/peer_lib.sh"
    peer_venv
    rm -f "$TIMES"/speed-*.times
    say "speed: ours, 6 steps of $SEQ tokens on $THREADS threads"
    B0=$(busy)
    timed speed-ours "$OUT/speed-ours.log" "$BIN" distill --student "$HF" --loss ce --data "$CALIB" \
        --seq-len "$SEQ" --batch-tokens "$SEQ" --max-tokens $((6 * SEQ)) --threads "$THREADS" \
        --out "$OUT/speed-ours" --force
    B1=$(busy)
    say "speed: PyTorch"
    timed speed-peer "$OUT/speed-peer.log" "$PEER_PY" "$HERE/torch_train_step.py" --model "$HF" \
        --data "$CALIB" --seq-len "$SEQ" --steps 6 --threads "$THREADS"
    B2=$(busy)
    SPEED_MD=$(python3 - "$OUT/speed-ours/train_log.jsonl" "$TIMES/speed-ours.times" \
        "$OUT/speed-peer.log" "$OUT/speed.json" "$THREADS" "$TIMES/speed-peer.times" "$B0" "$B1" "$B2" <<'EOF'
import json, os, statistics, sys, time
log, times, peer_log, out, threads, peer_times, b0, b1, b2 = sys.argv[1:]
hz = os.sysconf("SC_CLK_TCK")
def others(times, busy):
    # Cores busy with other processes while the command ran: all busy time less its own.
    w, u, s, _ = map(float, open(times).read().split())
    return max(0.0, (busy / hz - u - s) / w)
steps = [json.loads(l) for l in open(log) if l.strip()]
prev, secs, toks = 0, [], []
for s in steps:
    secs.append(s["secs"])
    toks.append(s["tokens"] - prev)
    prev = s["tokens"]
med = statistics.median(secs[1:])
rss = max(int(l.split()[3]) for l in open(times) if l.strip())
ours = {"tool": "compress distill", "threads": int(threads), "seq_len": toks[0],
        "tokens_per_step": toks[0], "steps": len(steps),
        "step_secs": [round(s, 4) for s in secs], "median_secs": round(med, 4),
        "tokens_per_second": round(toks[0] / med, 2), "peak_rss_mib": round(rss / 1024, 1)}
peer = json.loads([l for l in open(peer_log) if l.startswith("{")][-1])
ours["other_cores"] = round(others(times, int(b1) - int(b0)), 2)
peer["other_cores"] = round(others(peer_times, int(b2) - int(b1)), 2)
ratio = ours["tokens_per_second"] / peer["tokens_per_second"]
rec = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ours": ours,
       "pytorch": peer, "ratio_ours_over_pytorch_tokens_per_second": round(ratio, 3)}
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\n")
def line(name, d):
    return (f"- {name}: {d['median_secs']:.2f} s per step of {d['tokens_per_step']} tokens "
            f"(median of steps 2..{d['steps']}), {d['tokens_per_second']:.1f} tok/s, "
            f"peak RSS {d['peak_rss_mib']:.0f} MiB; other jobs used {d['other_cores']:.1f} cores meanwhile")
print(f"Training speed, full f32 fine-tuning with CE, seq {toks[0]}, {threads} threads, same weights:")
print()
print(line("ours (compress distill)", ours))
print(line(f"PyTorch {peer['torch']}, transformers {peer['transformers']} "
           f"(attention {peer.get('attn_implementation')})", peer))
print(f"- ours / PyTorch tokens/s: {ratio:.2f}")
if max(ours["other_cores"], peer["other_cores"]) > max(0.2, os.cpu_count() - int(threads)):
    print("- note: other jobs shared the cores; PyTorch's OpenMP threads suffer most from that, "
          "so the ratio overstates ours")
EOF
    )
fi

# f. Summary.
python3 - "$OUT/curve.csv" "$TIMES" "$RUNS" >"$OUT/summary.table" <<'EOF'
import csv, os, sys
curve, times, runs = sys.argv[1], sys.argv[2], sys.argv[3].split()
rows = list(csv.DictReader(open(curve)))
def last(run):
    r = [x for x in rows if x["run"] == run]
    return max(r, key=lambda x: int(x["tokens"]))
def cost(name):
    f = os.path.join(times, name + ".times")
    if not os.path.exists(f):
        return "-", "-", "-"
    t = [list(map(float, l.split())) for l in open(f) if l.strip()]
    return (f"{sum(x[0] for x in t):.0f}", f"{sum(x[1] + x[2] for x in t):.0f}",
            f"{max(x[3] for x in t) / 1024:.0f}")
print("| run | tokens | perplexity | recovered | wall s | CPU s | peak RSS MiB |")
print("|---|---|---|---|---|---|---|")
refs = [("teacher", "teacher", None), ("pruned", "pruned (channels -25%)", "prune")]
if "kd-tc" in runs or "kdce-tc" in runs:
    refs.append(("teacher-tc", "corrected teacher (CE on the data; its tokens)", "teacher-tc"))
for run, label, timing in refs + [(r, r, r) for r in runs]:
    x = last(run)
    w, c, m = cost(timing) if timing else ("-", "-", "-")
    if timing and os.path.exists(os.path.join(times, timing + ".resumed")):
        label += " (resumed: seconds of the last sitting)"
    rec = f"{100 * float(x['recovered']):.1f}%"
    print(f"| {label} | {x['tokens']} | {x['perplexity']} ± {x['perplexity_se']} | {rec} | {w} | {c} | {m} |")
EOF
{
    echo "Teacher $TEACHER, student pruned by \`compress prune --structured channels --ratio 0.25\`; $TOKENS tokens per run (seq $SEQ, $BATCH tokens per step, warmup 10%, cosine, seed 0; KD and CE lr 3e-4, LoRA r16 all linears lr 1e-3); perplexity on wikitext-2 test (ctx 512, $CHUNKS chunks); $(nproc) threads, $(date -u +%F), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    cat "$OUT/summary.table"
    if [[ -n "$SPEED_MD" ]]; then
        echo
        echo "$SPEED_MD"
    fi
    echo
    echo "Curve: $OUT/curve.csv, $OUT/curve.svg"
} | tee "$OUT/summary.md"
rm -f "$OUT/summary.table"
