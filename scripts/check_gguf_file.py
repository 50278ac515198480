#!/usr/bin/env python3
"""Read a GGUF file with PyPI gguf's GGUFReader, print its keys and tensors, and validate it.

Requirements: pip install gguf==0.19.0 numpy
Usage: python3 scripts/check_gguf_file.py FILE.gguf [--dequant] [--quiet]

Checks (exit 1 on any failure):
  * the llama.cpp keys of the architecture are present with the right types
    ({arch}.context_length, embedding_length, block_count, feed_forward_length,
    attention.head_count, attention.head_count_kv, rope.freq_base,
    attention.layer_norm_rms_epsilon, rope.dimension_count, vocab_size;
    general.architecture, general.name, general.file_type, general.quantization_version, and
    general.alignment when present (32 otherwise); tokenizer.ggml.model/tokens/token_type);
  * tensor shapes agree with those numbers (token_embd, output, blocks, norms), the names
    follow llama.cpp's naming, every tensor starts at a multiple of general.alignment, and
    1-D tensors are F32;
  * tokenizer arrays have vocab_size entries;
  * with --dequant, gguf.quants.dequantize of every tensor is finite.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np

from gguf import GGUFReader, GGUFValueType


def field_value(f):
    t = f.types[0]
    if t == GGUFValueType.ARRAY:
        return f"[{f.types[1].name} x {len(f.data)}]"
    if t == GGUFValueType.STRING:
        s = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        return repr(s if len(s) < 70 else s[:67] + "...")
    return f.parts[f.data[0]].tolist()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--dequant", action="store_true", help="dequantize every tensor with gguf-py")
    ap.add_argument("--quiet", action="store_true", help="print only problems and the summary")
    a = ap.parse_args()
    r = GGUFReader(a.file)
    errors: list[str] = []
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    if not a.quiet:
        for k, f in fields.items():
            print(f"{k:45s} {'/'.join(t.name for t in f.types):14s} {field_value(f)}")

    def get(key, types):
        f = fields.get(key)
        if f is None:
            errors.append(f"missing key {key}")
            return None
        if f.types[0] not in types:
            errors.append(f"{key} has type {f.types[0].name}, expected {'/'.join(t.name for t in types)}")
            return None
        if f.types[0] == GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode()
        if f.types[0] == GGUFValueType.ARRAY:
            return f
        return f.parts[f.data[0]].tolist()[0]

    U32 = (GGUFValueType.UINT32, GGUFValueType.UINT64)
    F32 = (GGUFValueType.FLOAT32,)
    STR = (GGUFValueType.STRING,)
    arch = get("general.architecture", STR) or "llama"
    get("general.name", STR)
    get("general.file_type", U32)
    align = get("general.alignment", U32) if "general.alignment" in fields else 32  # optional, 32 by default
    get("general.quantization_version", U32)
    n = {k: get(f"{arch}.{k}", U32) for k in ("context_length", "embedding_length", "block_count",
                                              "feed_forward_length", "attention.head_count",
                                              "attention.head_count_kv", "rope.dimension_count", "vocab_size")}
    for k in ("rope.freq_base", "attention.layer_norm_rms_epsilon"):
        get(f"{arch}.{k}", F32)
    get("tokenizer.ggml.model", STR)
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        f = get(k, (GGUFValueType.ARRAY,))
        if f is not None and n["vocab_size"] is not None and len(f.data) != n["vocab_size"]:
            errors.append(f"{k} has {len(f.data)} entries, vocab_size is {n['vocab_size']}")

    h, v, ff, L = n["embedding_length"], n["vocab_size"], n["feed_forward_length"], n["block_count"]
    hd = n["rope.dimension_count"]
    q = (n["attention.head_count"] or 0) * (hd or 0)
    kv = (n["attention.head_count_kv"] or 0) * (hd or 0)
    expect = {"token_embd.weight": [v, h], "output.weight": [v, h], "output_norm.weight": [h]}
    for i in range(L or 0):
        expect.update({
            f"blk.{i}.attn_norm.weight": [h], f"blk.{i}.ffn_norm.weight": [h],
            f"blk.{i}.attn_q.weight": [q, h], f"blk.{i}.attn_k.weight": [kv, h], f"blk.{i}.attn_v.weight": [kv, h],
            f"blk.{i}.attn_output.weight": [h, q], f"blk.{i}.ffn_gate.weight": [ff, h],
            f"blk.{i}.ffn_up.weight": [ff, h], f"blk.{i}.ffn_down.weight": [h, ff],
            f"blk.{i}.attn_q.bias": [q], f"blk.{i}.attn_k.bias": [kv], f"blk.{i}.attn_v.bias": [kv],
            f"blk.{i}.attn_output.bias": [h],
        })
    names = set()
    types = Counter()
    for t in r.tensors:
        names.add(t.name)
        shape = [int(d) for d in reversed(t.shape.tolist())]  # row-major, outermost first
        types[t.tensor_type.name] += 1
        if not a.quiet:
            print(f"{t.name:32s} {t.tensor_type.name:5s} {shape} @ {t.data_offset}")
        if t.data_offset % align:
            errors.append(f"{t.name}: offset {t.data_offset} not aligned to {align}")
        if t.name not in expect:
            errors.append(f"{t.name}: not a llama.cpp tensor name for {arch}")
        elif shape != expect[t.name]:
            errors.append(f"{t.name}: shape {shape}, expected {expect[t.name]}")
        if len(shape) == 1 and t.tensor_type.name != "F32":
            errors.append(f"{t.name}: 1-D tensor stored as {t.tensor_type.name}")
        if a.dequant:
            import gguf
            x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            if not np.all(np.isfinite(x)):
                errors.append(f"{t.name}: non-finite values after dequantization")
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{p}.weight" for i in range(L or 0)
        for p in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    for m in required:
        if m not in names:
            errors.append(f"missing tensor {m}")
    params = sum(int(np.prod(t.shape)) for t in r.tensors)
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    print(f"{a.file}: {len(r.tensors)} tensors ({', '.join(f'{k} {c}' for k, c in sorted(types.items()))}), "
          f"{params} weights, {nbytes} bytes of data = {8 * nbytes / max(params, 1):.3f} bpw, "
          f"{len(fields)} keys, alignment {align}")
    for e in errors:
        print("error:", e, file=sys.stderr)
    print("ok" if not errors else f"{len(errors)} problems", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
