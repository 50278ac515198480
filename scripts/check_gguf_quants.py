#!/usr/bin/env python3
"""Compare the Rust block quantizers (quant::blocks) with PyPI gguf.

Requirements: pip install gguf==0.19.0 numpy; a built example binary:
    cargo build --release -p quant --example quantize_blocks

Usage (from the repository root):
    python3 scripts/check_gguf_quants.py [--bin target/release/examples/quantize_blocks]
                                         [--seed 1] [--rows 64] [--row-len 512]

For random inputs (gaussian weights with outliers, plus edge cases: all-zero and constant
blocks, ties, tiny and huge magnitudes) it checks
  1. byte-for-byte equality with gguf.quants.quantize for every type gguf-py can quantize
     (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16);
  2. for EVERY type we write (incl. Q3_K, Q4_K, Q5_K, Q6_K, and the importance-weighted path),
     that gguf.quants.dequantize(our bytes) equals our own dequantization exactly.
Exits 1 on any mismatch, 0 with a summary otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T

REPO = Path(__file__).resolve().parent.parent
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "F16", "BF16"]


def make_input(rng: np.random.Generator, rows: int, row_len: int) -> np.ndarray:
    x = rng.normal(0.0, 0.05, size=(rows, row_len)).astype(np.float32)
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, size=flat.size // 40, replace=False)
    flat[idx] *= rng.uniform(4, 12, size=idx.size).astype(np.float32)
    # Edge cases in the first rows (block-aligned where it matters).
    x[0, :256] = 0.0
    x[0, 256:288] = 0.25
    x[1, :32] = np.linspace(-1, 1, 32, dtype=np.float32)
    x[1, 32:64] = np.float32(1e-6) * rng.normal(size=32).astype(np.float32)
    x[1, 64:96] = np.float32(300.0) * rng.normal(size=32).astype(np.float32)
    x[2, :32] = -np.abs(x[2, :32])
    x[2, 32:64] = np.abs(x[2, 32:64]) + 0.1
    x[3, :16] = 0.0
    x[3, 16] = 1.0
    return x


def run_ours(binary: Path, tmp: Path, name: str, x: np.ndarray, imp: np.ndarray | None) -> tuple[bytes, np.ndarray]:
    src, out, deq = tmp / "x.f32", tmp / f"{name}.bin", tmp / f"{name}.deq"
    x.astype("<f4").tofile(src)
    cmd = [str(binary), name.lower(), str(src), str(out), "--row", str(x.shape[1]), "--dequant", str(deq)]
    if imp is not None:
        (tmp / "w.f32").write_bytes(imp.astype("<f4").tobytes())
        cmd += ["--importance", str(tmp / "w.f32")]
    subprocess.run(cmd, check=True)
    return out.read_bytes(), np.fromfile(deq, dtype="<f4")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=REPO / "target/release/examples/quantize_blocks")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--row-len", type=int, default=512)
    a = ap.parse_args()
    if not a.bin.exists():
        print(f"error: {a.bin} missing; cargo build --release -p quant --example quantize_blocks", file=sys.stderr)
        return 2
    rng = np.random.default_rng(a.seed)
    x = make_input(rng, a.rows, a.row_len)
    imp = (rng.uniform(0.5, 1.5, a.row_len) * np.where(rng.uniform(size=a.row_len) < 0.1, 100.0, 1.0)).astype(np.float32)
    bad = 0
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name in TYPES:
            qt = T[name]
            for label, w in (("plain", None), ("importance", imp)):
                ours, our_deq = run_ours(a.bin, tmp, name, x, w)
                raw = np.frombuffer(ours, dtype=np.uint8).reshape(a.rows, -1).copy()
                py_deq = np.asarray(gguf.quants.dequantize(raw, qt), dtype=np.float32).reshape(-1)
                same_deq = py_deq.tobytes() == our_deq.tobytes()
                line = f"{name:5s} {label:10s} dequantize(ours) py==rust: {'ok' if same_deq else 'MISMATCH'}"
                bad += not same_deq
                if w is None:
                    try:
                        ref = np.ascontiguousarray(gguf.quants.quantize(x, qt)).tobytes()
                    except NotImplementedError:
                        ref = None
                    if ref is not None:
                        ok = ref == ours
                        line += f"; bytes vs gguf.quants.quantize: {'identical' if ok else 'DIFFER'}"
                        if not ok:
                            bad += 1
                            d = np.flatnonzero(np.frombuffer(ref, np.uint8) != np.frombuffer(ours, np.uint8))
                            line += f" ({d.size} bytes, first at {d[0]})"
                    else:
                        line += "; gguf-py has no quantizer"
                rel = float(np.sqrt(np.mean((our_deq - x.reshape(-1)) ** 2) / np.mean(x**2)))
                werr = float(np.sum(imp[None, :] * (our_deq.reshape(x.shape) - x) ** 2))
                line += f"; rel rmse {rel:.4f}; imp-weighted err {werr:.4g}"
                print(line)
    print("all checks passed" if bad == 0 else f"{bad} mismatches", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
