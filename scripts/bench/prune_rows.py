#!/usr/bin/env python3
"""Helpers of scripts/bench/prune.sh (standard library only, so the system python runs it).

    prune_rows.py record KEY key=value...   one JSON line for a row, on stdout
    prune_rows.py table ROWS.jsonl          the markdown table, on stdout
    prune_rows.py zeros DIR_OR_FILE         "zeros params" of the decoder linear weights
    prune_rows.py has ROWS.jsonl KEY        exit 0 when ROWS.jsonl holds a measured row KEY

record reads what the row left behind: DIR/prune_report.json (ours), DIR/peer_report.json
(llm-compressor), DIR/quant_report.json, the eval JSON and the /usr/bin/time lines
("%e %U %S %M": wall, user, sys seconds and peak RSS KiB, one line per step).
"""

import json
import os
import re
import struct
import sys
from array import array

LINEAR = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


def zeros(path):
    """Exact zeros and parameter count of the decoder linear weights of a safetensors
    file (or DIR/model.safetensors); bf16, f16 and f32 tensors."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    z = n = 0
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
        base = 8 + hlen
        for name, t in header.items():
            if name == "__metadata__" or not LINEAR.search(name):
                continue
            dt = t["dtype"]
            if dt in ("BF16", "F16"):
                code, neg = "H", 0x8000
            elif dt == "F32":
                code, neg = "I", 0x80000000
            else:
                continue
            a, b = t["data_offsets"]
            f.seek(base + a)
            arr = array(code)
            arr.frombytes(f.read(b - a))
            if sys.byteorder != "little":
                arr.byteswap()
            z += arr.count(0) + arr.count(neg)
            n += len(arr)
    return z, n


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fsize(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def record(key, kv):
    r = {"key": key, **kv}
    d = kv.get("dir", "")
    rep = load(os.path.join(d, "prune_report.json")) if d else None
    src = kv.get("source")  # the pruned folder a quant step started from
    srep = load(os.path.join(src, "prune_report.json")) if src else None
    peer = load(os.path.join(d, "peer_report.json")) if d else None
    qrep = load(os.path.join(d, "quant_report.json")) if d else None
    ev = load(kv["eval"]) if kv.get("eval") else None
    base = rep or srep
    if base:
        r["params"] = base.get("params", base.get("params_after"))
    elif kv.get("params_from"):
        pr = load(os.path.join(kv["params_from"], "prune_report.json"))
        if pr:
            r["params"] = pr.get("params")
    # Bytes: our reports' own fields, else the file on disk.
    dense = None
    sparse = None
    if rep:
        dense = rep.get("dense_bytes", rep.get("bytes_after"))
        sp = rep.get("sparse")
        if isinstance(sp, dict):
            sparse = sp.get("sparse_bytes")
    if dense is None and qrep:
        dense = qrep.get("dense_bytes")
    if dense is None and d:
        dense = fsize(os.path.join(d, "model.safetensors")) or fsize(os.path.join(d, "model.gguf"))
    if sparse is None and d:
        sparse = fsize(os.path.join(d, "packed", "model.safetensors"))
        if sparse is not None:
            r["sparse_kind"] = "packed"
    r["dense_bytes"], r["sparse_bytes"] = dense, sparse
    # Linear sparsity: measured on the dense safetensors where there is one.
    st = os.path.join(d, "model.safetensors") if d else ""
    if st and os.path.isfile(st):
        z, n = zeros(st)
        r["linear_sparsity"] = z / n if n else None
    elif rep and isinstance(rep.get("report"), dict) and rep["report"].get("linear_params"):
        r["linear_sparsity"] = rep["report"]["linear_zeros"] / rep["report"]["linear_params"]
    if peer:
        r["peer_prune_seconds"] = peer.get("prune_wall_seconds")
        r["dtype"] = "f32"
    if ev:
        r["ppl"] = ev["perplexity"]["value"]
        r["ppl_se"] = ev["perplexity"]["stderr"]
        size = ev.get("size", {})
        if r.get("dense_bytes") is None:
            r["dense_bytes"] = size.get("bytes")
        if r.get("params") is None:
            r["params"] = size.get("params")
    # Times: one /usr/bin/time line per step.
    wall = cpu = 0.0
    rss = 0
    steps = 0
    if kv.get("times") and os.path.isfile(kv["times"]):
        for line in open(kv["times"]):
            parts = line.split()
            if len(parts) != 4:
                continue
            try:
                e, u, s, m = float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3])
            except ValueError:
                continue
            wall += e
            cpu += u + s
            rss = max(rss, m)
            steps += 1
    if steps:
        r["wall_s"], r["cpu_s"], r["rss_mib"] = wall, cpu, rss / 1024
    print(json.dumps(r))


def fmt_int(v):
    return "-" if v is None else f"{int(v)}"


def load_rows(path):
    """The rows of a rows file, the last line of each key winning (a resumed bench re-runs
    failed rows and appends them)."""
    by_key = {}
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            by_key.pop(r["key"], None)
            by_key[r["key"]] = r
    return list(by_key.values())


def table(path):
    rows = load_rows(path)
    teacher = next((r for r in rows if r["key"] == "teacher" and "ppl" in r), None)
    t_ppl = teacher["ppl"] if teacher else None
    peers = {r["pair"]: r for r in rows if r.get("tool") == "llmcompressor" and r.get("pair")}
    ours_params = {r["pair"]: r.get("params") for r in rows if r.get("tool") == "ours" and r.get("pair")}
    out = [
        "| row | tool | method | pattern | params | linear sparsity | bytes dense | bytes sparse | perplexity | ratio to teacher | ours / peer ppl | wall s | CPU s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = []
    for r in rows:
        if r.get("tool") == "llmcompressor":
            continue
        ordered.append(r)
        peer = peers.get(r.get("pair")) if r.get("pair") else None
        if peer is not None and peer not in ordered:
            ordered.append(peer)
    ordered += [p for p in peers.values() if p not in ordered]
    for r in ordered:
        if r.get("note"):
            out.append(f"| {r['key']} | {r.get('tool', '')} | {r.get('method', '')} | {r.get('pattern', '')} | {r['note']} |" + " |" * 9)
            continue
        ppl = r.get("ppl")
        pstr = "-" if ppl is None else f"{ppl:.4f} ± {r.get('ppl_se', 0):.4f}"
        ratio = "-" if ppl is None or not t_ppl else f"{ppl / t_ppl:.4f}"
        vs = "-"
        if r.get("tool") == "ours" and r.get("pair") in peers and ppl is not None:
            pp = peers[r["pair"]].get("ppl")
            if pp:
                vs = f"{ppl / pp:.4f}"
        params = r.get("params")
        if params is None and r.get("tool") == "llmcompressor":
            params = ours_params.get(r.get("pair"))
        sp = r.get("linear_sparsity")
        dense = fmt_int(r.get("dense_bytes"))
        if r.get("dtype") == "f32" and dense != "-":
            dense += " (f32)"
        sparse = fmt_int(r.get("sparse_bytes"))
        if r.get("sparse_kind") == "packed" and sparse != "-":
            sparse += " (packed)"
        wall = "-" if "wall_s" not in r else f"{r['wall_s']:.1f}"
        cpu = "-" if "cpu_s" not in r else f"{r['cpu_s']:.1f}"
        rss = "-" if "rss_mib" not in r else f"{r['rss_mib']:.0f}"
        out.append(
            f"| {r['key']} | {r.get('tool', '')} | {r.get('method', '')} | {r.get('pattern', '')} | {fmt_int(params)} | "
            f"{'-' if sp is None else f'{sp:.4f}'} | {dense} | {sparse} | {pstr} | {ratio} | {vs} | {wall} | {cpu} | {rss} |"
        )
    print("\n".join(out))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd = sys.argv[1]
    if cmd == "record":
        kv = dict(a.split("=", 1) for a in sys.argv[3:])
        record(sys.argv[2], kv)
    elif cmd == "table":
        table(sys.argv[2])
    elif cmd == "has":
        ok = os.path.exists(sys.argv[2]) and any(
            r["key"] == sys.argv[3] and "ppl" in r and not r.get("note") for r in load_rows(sys.argv[2])
        )
        sys.exit(0 if ok else 1)
    elif cmd == "zeros":
        z, n = zeros(sys.argv[2])
        print(z, n)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
