#!/usr/bin/env python3
"""Seeds for the `tokenizer_gguf` fuzz target (see fuzz/README.md).

Usage: gguf_tokenizer_seeds.py REAL.gguf OUT_DIR

REAL.gguf is a tiny model with a real `tokenizer.ggml.*` vocabulary
(/work/shared/models/llama-2-tiny-random.gguf: 32000 SentencePiece tokens, hidden size 8).
Writes it with the vocabulary (and the embedding/output rows) cut to its first N tokens,
small enough for fast executions, and gpt2-style variants with merges under each
`tokenizer.ggml.pre` name.
Standard library only; GGUF v2/v3 little-endian.
"""
import struct
import sys
from pathlib import Path

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
          BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}


class Reader:
    def __init__(self, b):
        self.b, self.o = b, 0

    def take(self, fmt):
        v = struct.unpack_from(fmt, self.b, self.o)
        self.o += struct.calcsize(fmt)
        return v[0]

    def str(self):
        n = self.take("<Q")
        s = self.b[self.o:self.o + n]
        self.o += n
        return s

    def value(self, ty):
        if ty == STR:
            return self.str()
        if ty == ARR:
            ety, n = self.take("<I"), self.take("<Q")
            return (ety, [self.value(ety) for _ in range(n)])
        return self.take(SCALAR[ty])


def parse(b):
    r = Reader(b)
    magic, version = r.take("<4s"), r.take("<I")
    assert magic == b"GGUF", magic
    nt, nkv = r.take("<Q"), r.take("<Q")
    kvs = []
    for _ in range(nkv):
        k, ty = r.str(), r.take("<I")
        kvs.append((k, ty, r.value(ty)))
    infos = []
    for _ in range(nt):
        name, nd = r.str(), r.take("<I")
        dims = [r.take("<Q") for _ in range(nd)]
        ty, off = r.take("<I"), r.take("<Q")
        infos.append((name, dims, ty, off))
    align = 32
    for k, ty, v in kvs:
        if k == b"general.alignment":
            align = v
    start = (r.o + align - 1) // align * align
    return version, kvs, infos, b[start:], align


def wvalue(ty, v):
    if ty == STR:
        return struct.pack("<Q", len(v)) + v
    if ty == ARR:
        ety, items = v
        return struct.pack("<IQ", ety, len(items)) + b"".join(wvalue(ety, x) for x in items)
    return struct.pack(SCALAR[ty], v)


def write(version, kvs, infos, data, align):
    out = b"GGUF" + struct.pack("<IQQ", version, len(infos), len(kvs))
    for k, ty, v in kvs:
        out += wvalue(STR, k) + struct.pack("<I", ty) + wvalue(ty, v)
    for name, dims, ty, off in infos:
        out += wvalue(STR, name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ty, off)
    out += b"\0" * ((-len(out)) % align)
    return out + data


def cut_model(version, kvs, infos, data, align, n, extra=()):
    """The model with its vocabulary cut to the first `n` tokens: the `tokenizer.*` arrays
    and the vocabulary rows of `token_embd`/`output` (the last dimension), so the
    checkpoint still opens and the tokenizer fits it."""
    out_kvs = []
    for k, ty, v in kvs:
        if ty == ARR and k.startswith(b"tokenizer."):
            v = (v[0], v[1][:n])
        out_kvs.append((k, ty, v))
    out_kvs += list(extra)
    ends = sorted(off for _, _, _, off in infos) + [len(data)]
    out_infos, out_data = [], b""
    for name, dims, ty, off in infos:
        nxt = min(e for e in ends if e > off)
        blob = data[off:nxt]
        if name in (b"token_embd.weight", b"output.weight"):
            row = len(blob) // dims[-1]
            dims = dims[:-1] + [n]
            blob = blob[:row * n]
        out_data += b"\0" * ((-len(out_data)) % align)
        out_infos.append((name, dims, ty, len(out_data)))
        out_data += blob
    return write(version, out_kvs, out_infos, out_data, align)


def main():
    real, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    version, kvs, infos, data, align = parse(real.read_bytes())
    # llama (SentencePiece) with the real vocabulary's first N tokens: <unk> <s> </s>, the
    # 256 byte tokens, then the first merged pieces.
    for n in (3, 40, 300, 600):
        (out / f"llama_{n}").write_bytes(cut_model(version, kvs, infos, data, align, n))
    # gpt2 byte-level BPE: the same tokens plus the merges between them, under every
    # pre-tokenizer name (and one unknown name).
    n = 300
    toks = [v for k, ty, v in kvs if k == b"tokenizer.ggml.tokens"][0][1][:n]
    index = set(toks)
    merges = []
    for t in toks:
        s = t.decode("utf-8", "replace")
        for i in range(1, len(s)):
            a, b = s[:i].encode(), s[i:].encode()
            if a in index and b in index:
                merges.append(a + b" " + b)
    gkvs = [(k, ty, v) for k, ty, v in kvs if k != b"tokenizer.ggml.model"]
    for pre in (b"default", b"smollm", b"llama3", b"qwen2", b"unknown"):
        extra = [(b"tokenizer.ggml.model", STR, b"gpt2"), (b"tokenizer.ggml.pre", STR, pre),
                 (b"tokenizer.ggml.merges", ARR, (STR, merges)),
                 (b"tokenizer.ggml.add_bos_token", BOOL, True)]
        (out / f"gpt2_{pre.decode()}").write_bytes(
            cut_model(version, gkvs, infos, data, align, n, extra))


if __name__ == "__main__":
    main()
