#!/usr/bin/env python3
"""Generate GGUF dequantization (and quantization) reference fixtures.

Requirements (not installed by this script):
    pip install gguf==0.19.0 numpy

Usage (from the repository root):
    python3 scripts/gen_gguf_fixtures.py [--out model/tests/fixtures/dequant]
    python3 scripts/gen_gguf_fixtures.py --check   # compare committed files, write nothing

--check exits 1 if a committed fixture differs from what this script would
write, and exits 0 with a "skipped" note when gguf 0.19.0 / numpy are not
installed (so CI machines without them are not failed by it).

For each GGML type in TYPES this writes `<TYPE>.json`:
    {"type": "Q4_K", "ggml_type": 12, "n_values": 512, "block_size": 256,
     "type_size": 144, "source": "quantized"|"random_bytes"|"cast",
     "data_hex": "<raw tensor bytes>",
     "expected": [f32 values from gguf.quants.dequantize(raw bytes, type)]}

For the types in QUANT_TYPES it also writes `<TYPE>.quant.json`:
    {"type", "ggml_type", "n_values", "input": [f32 input values],
     "data_hex": "<gguf.quants.quantize(input) bytes>"}
so a quantizer can be checked byte-for-byte against gguf-py (whose
quantizers for these types mirror ggml's reference `quantize_row_*_ref`,
computed in f32). The quant input is the same tensor as in `<TYPE>.json`.

Floats are written with repr(float(np.float32(x))), which round-trips to the
exact same f32 when parsed as f64 and cast to f32. Output is deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    import numpy as np

    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.constants import GGML_QUANT_SIZES

    IMPORT_ERROR = None
except ImportError as e:  # handled in main()
    IMPORT_ERROR = e

SEED = 20240601
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"]
QUANT_TYPES = ["Q8_0", "Q4_0", "Q4_1"]
FLOAT_TYPES = ("F32", "F16", "BF16")
N_BLOCKS = 2
N_FLOAT_VALUES = 64
MAX_FILE_BYTES = 30 * 1024

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "model" / "tests" / "fixtures" / "dequant"


def f32_list(values: np.ndarray) -> list[float]:
    out = []
    for x in np.asarray(values, dtype=np.float32).ravel():
        v = float(np.float32(x))
        if not math.isfinite(v):
            raise ValueError(f"non-finite value {v} in fixture")
        out.append(v)
    return out


def dump_floats(values: list[float]) -> str:
    # float.__repr__ is the shortest string that round-trips the f64, and every
    # f32 is exactly representable as an f64.
    return "[" + ", ".join(repr(v) for v in values) + "]"


def make_input(rng: np.random.Generator, n: int, qtype_name: str) -> np.ndarray:
    """Random-normal weights (scale ~0.05) with a few outliers."""
    x = rng.normal(0.0, 0.05, size=n).astype(np.float32)
    idx = rng.choice(n, size=max(2, n // 32), replace=False)
    x[idx] = rng.choice([-1.0, 1.0], size=idx.size) * rng.uniform(0.2, 0.6, size=idx.size)
    if qtype_name in FLOAT_TYPES:
        # A few edge values that are still finite in every format.
        x[0] = -0.0
        x[1] = 0.0
        x[2] = 3.0e-6  # f16 subnormal
        x[3] = -1.0e-38  # f32 subnormal-ish (bf16 keeps it; f16 -> -0.0)
        x[4] = 60000.0  # close to f16 max (65504)
        x[5] = 1.0 / 3.0  # exercises round-to-nearest-even in f16/bf16
    return x


def rand_f16(rng: np.random.Generator, n: int, lo: float, hi: float, signed: bool) -> np.ndarray:
    """f16 values with |v| log-uniform in [lo, hi]."""
    mag = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))
    if signed:
        mag = mag * rng.choice([-1.0, 1.0], size=n)
    v = mag.astype(np.float16)
    assert np.all(np.isfinite(v)) and np.all(v != 0)
    return v


def random_kquant_blocks(rng: np.random.Generator, name: str, n_blocks: int) -> bytes:
    """Random K-quant and IQ4_NL blocks (gguf-py 0.19.0 cannot quantize them) with sane f16 scales."""
    out = bytearray()
    for _ in range(n_blocks):
        if name in ("Q4_K", "Q5_K"):
            # block_q4_K: d f16, dmin f16, scales[12] (6-bit packed), qs[128]      -> 144 B
            # block_q5_K: d f16, dmin f16, scales[12], qh[32], qs[128]             -> 176 B
            d = rand_f16(rng, 1, 1e-3, 1e-1, signed=False)
            dmin = rand_f16(rng, 1, 1e-3, 1e-1, signed=False)
            scales = rng.integers(0, 256, size=12, dtype=np.uint8)
            qh = rng.integers(0, 256, size=32, dtype=np.uint8) if name == "Q5_K" else np.zeros(0, np.uint8)
            qs = rng.integers(0, 256, size=128, dtype=np.uint8)
            blk = d.tobytes() + dmin.tobytes() + scales.tobytes() + qh.tobytes() + qs.tobytes()
        elif name == "Q6_K":
            # block_q6_K: ql[128], qh[64], scales[16] (int8), d f16                -> 210 B
            ql = rng.integers(0, 256, size=128, dtype=np.uint8)
            qh = rng.integers(0, 256, size=64, dtype=np.uint8)
            scales = rng.integers(-128, 128, size=16, dtype=np.int8)
            d = rand_f16(rng, 1, 1e-3, 1e-1, signed=True)
            blk = ql.tobytes() + qh.tobytes() + scales.tobytes() + d.tobytes()
        elif name == "IQ4_NL":
            # block_iq4_nl: d f16, qs[16] (4-bit codebook indices)                 -> 18 B
            d = rand_f16(rng, 1, 1e-3, 1e-1, signed=True)
            qs = rng.integers(0, 256, size=16, dtype=np.uint8)
            blk = d.tobytes() + qs.tobytes()
        else:
            raise ValueError(name)
        assert len(blk) == GGML_QUANT_SIZES[T[name]][1], (name, len(blk))
        out += blk
    return bytes(out)


def can_quantize(qtype: T) -> bool:
    probe = np.zeros(GGML_QUANT_SIZES[qtype][0], dtype=np.float32)
    try:
        gguf.quants.quantize(probe, qtype)
        return True
    except NotImplementedError:
        return False


def write_json(path: Path, obj: dict, float_keys: tuple[str, ...]) -> int:
    parts = []
    for k, v in obj.items():
        if k in float_keys:
            parts.append(f"{json.dumps(k)}: {dump_floats(v)}")
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v)}")
    text = "{\n  " + ",\n  ".join(parts) + "\n}\n"
    # Self-check: parse back and verify the exact f32 bits round-trip.
    back = json.loads(text)
    for k in float_keys:
        a = np.asarray(back[k], dtype=np.float64).astype(np.float32)
        b = np.asarray(obj[k], dtype=np.float32)
        assert a.tobytes() == b.tobytes(), f"{path}: {k} does not round-trip"
    path.write_text(text)
    size = path.stat().st_size
    if size >= MAX_FILE_BYTES:
        raise RuntimeError(f"{path} is {size} bytes (limit {MAX_FILE_BYTES})")
    return size


def check(out: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), quiet=True)
        fresh = sorted(p.name for p in Path(tmp).glob("*.json"))
        bad = []
        for name in fresh:
            committed = out / name
            if not committed.is_file():
                bad.append(f"missing {committed}")
            elif committed.read_bytes() != (Path(tmp) / name).read_bytes():
                bad.append(f"differs {committed}")
    if bad:
        print("fixtures out of date (run python3 scripts/gen_gguf_fixtures.py):", file=sys.stderr)
        for b in bad:
            print("  " + b, file=sys.stderr)
        return 1
    print(f"fixtures: {len(fresh)} files in {out} match gguf 0.19.0 output")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--check", action="store_true", help="compare the committed fixtures; write nothing")
    args = ap.parse_args()

    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "not installed"
    if IMPORT_ERROR is not None or gguf_version != "0.19.0":
        msg = f"gguf 0.19.0 + numpy needed (gguf: {gguf_version}; {IMPORT_ERROR or 'version mismatch'})"
        if args.check:
            print(f"fixtures: --check skipped: {msg}")
            return 0
        if IMPORT_ERROR is not None:
            print(f"error: {msg}; pip install gguf==0.19.0 numpy", file=sys.stderr)
            return 2
        print(f"warning: {msg}; fixtures may differ", file=sys.stderr)
    if args.check:
        return check(args.out)
    generate(args.out, quiet=False)
    return 0


def generate(out: Path, quiet: bool) -> None:
    args = argparse.Namespace(out=out)
    gguf_version = version("gguf")
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    summary = []
    for name in TYPES:
        qtype = T[name]
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_values = N_FLOAT_VALUES if name in FLOAT_TYPES else N_BLOCKS * block_size

        if name in FLOAT_TYPES or can_quantize(qtype):
            x = make_input(rng, n_values, name)
            raw = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).tobytes()
            source = "cast" if name in FLOAT_TYPES else "quantized"
        else:
            x = None
            raw = random_kquant_blocks(rng, name, n_values // block_size)
            source = "random_bytes"

        assert len(raw) == n_values // block_size * type_size, (name, len(raw))
        deq = gguf.quants.dequantize(np.frombuffer(raw, dtype=np.uint8).copy(), qtype)
        deq = np.asarray(deq).astype(np.float32).ravel()
        assert deq.size == n_values, (name, deq.size)

        obj = {
            "type": name,
            "ggml_type": int(qtype),
            "n_values": n_values,
            "block_size": int(block_size),
            "type_size": int(type_size),
            "source": source,
            "data_hex": raw.hex(),
            "expected": f32_list(deq),
        }
        size = write_json(args.out / f"{name}.json", obj, ("expected",))
        line = f"{name:5s} id={int(qtype):2d} n={n_values:4d} bytes={len(raw):4d} {source:12s} {size:6d} B"
        if x is not None and source == "quantized":
            line += f"  max|deq-in|={float(np.max(np.abs(deq - x))):.4g}"
        line += f"  range=[{deq.min():.4g}, {deq.max():.4g}]"

        if name in QUANT_TYPES:
            assert x is not None and source == "quantized"
            qobj = {
                "type": name,
                "ggml_type": int(qtype),
                "n_values": n_values,
                "input": f32_list(x),
                "data_hex": raw.hex(),
            }
            line += f"  (+quant.json {write_json(args.out / f'{name}.quant.json', qobj, ('input',))} B)"
        summary.append(line)

    if not quiet:
        print(f"gguf {gguf_version}, numpy {np.__version__}, seed {SEED} -> {args.out}")
        for line in summary:
            print("  " + line)


if __name__ == "__main__":
    sys.exit(main())
