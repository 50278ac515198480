#!/usr/bin/env python3
"""Check a `compress quant --format dense,packed` output with the compressed-tensors package.

Usage:
    check_packed.py DIR [PACKED_DIR]

DIR holds the dense model (model.safetensors, bf16); PACKED_DIR (default DIR/packed) the
compressed-tensors `pack-quantized` model. The packed checkpoint is decompressed offline with
compressed-tensors' own model-free dequantizer
(compressed_tensors.entrypoints.convert.CompressedTensorsDequantizer: it parses the
`quantization_config` of config.json, matches the config groups' targets, unpacks
weight_packed / weight_zero_point and dequantizes with weight_scale and, for activation
order, weight_g_idx), and every tensor is compared with the dense one after casting both to
bf16. Every linear weight must match exactly (max abs difference 0), and so must the other
tensors (embeddings, norms), which both formats store as bf16.

Prints one JSON line on stdout; exit 0 when everything matches, 1 on a mismatch or a failed
check, 2 on bad usage. Requires torch, safetensors and compressed-tensors (scripts/check_packed.sh
installs what is missing).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json
import sys
from pathlib import Path


def log(msg: str) -> None:
    print(f"check_packed: {msg}", file=sys.stderr, flush=True)


def fail(summary: dict, msg: str) -> int:
    summary["ok"] = False
    summary["error"] = msg
    log(msg)
    print(json.dumps(summary))
    return 1


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    dense_dir = Path(argv[0])
    packed_dir = Path(argv[1]) if len(argv) == 2 else dense_dir / "packed"
    summary: dict = {"dense": str(dense_dir), "packed": str(packed_dir)}
    for f in (dense_dir / "model.safetensors", packed_dir / "model.safetensors", packed_dir / "config.json"):
        if not f.is_file():
            return fail(summary, f"missing {f}")

    import torch
    import compressed_tensors
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    from safetensors import safe_open
    from safetensors.torch import load_file

    summary["compressed_tensors"] = compressed_tensors.__version__
    qc = json.loads((packed_dir / "config.json").read_text()).get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
        return fail(summary, "config.json has no compressed-tensors pack-quantized quantization_config")
    summary["config_groups"] = {
        k: {"targets": v["targets"], **{a: v["weights"].get(a) for a in ("num_bits", "symmetric", "strategy", "group_size", "actorder")}}
        for k, v in qc["config_groups"].items()
    }

    # Stored dtypes and shapes, as vLLM expects them.
    with safe_open(str(packed_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        for n in names:
            t = f.get_slice(n)
            want = {"weight_packed": "I32", "weight_zero_point": "I32", "weight_g_idx": "I32", "weight_shape": "I64"}
            suffix = n.rpartition(".")[2]
            if suffix in want and t.get_dtype() != want[suffix]:
                return fail(summary, f"{n} is {t.get_dtype()}, expected {want[suffix]}")
    packed = load_file(str(packed_dir / "model.safetensors"))
    n_packed = sum(1 for n in packed if n.endswith(".weight_packed"))

    try:
        conv = CompressedTensorsDequantizer(str(packed_dir), dtype=torch.bfloat16)
        # 0.20 validate() dequantizes and checks for leftover qparams; 0.18's only checks that
        # every targeted module has exactly the expected tensors, then process() dequantizes.
        deq = conv.validate(dict(packed))
        if deq is None:
            deq = conv.process(dict(packed))
    except Exception as e:  # noqa: BLE001 - report whatever compressed-tensors raised
        return fail(summary, f"compressed-tensors could not decompress {packed_dir}: {type(e).__name__}: {e}")

    dense = load_file(str(dense_dir / "model.safetensors"))
    if set(deq) != set(dense):
        extra, missing = sorted(set(deq) - set(dense)), sorted(set(dense) - set(deq))
        return fail(summary, f"tensor names differ: only packed {extra[:5]}, only dense {missing[:5]}")
    lin_max, other_max, worst = 0.0, 0.0, None
    for name, d in dense.items():
        p = deq[name]
        if tuple(p.shape) != tuple(d.shape):
            return fail(summary, f"{name}: packed shape {tuple(p.shape)} != dense {tuple(d.shape)}")
        diff = (p.to(torch.bfloat16).float() - d.to(torch.bfloat16).float()).abs().max().item()
        module = name.rpartition(".")[0]
        if f"{module}.weight_packed" in packed and name.endswith(".weight"):
            if worst is None or diff > lin_max:
                worst, lin_max = name, diff
        else:
            other_max = max(other_max, diff)
    summary.update(
        {
            "linears": n_packed,
            "tensors": len(dense),
            "max_abs_diff": lin_max,
            "other_max_abs_diff": other_max,
            "packed_bytes": (packed_dir / "model.safetensors").stat().st_size,
            "dense_bytes": (dense_dir / "model.safetensors").stat().st_size,
        }
    )
    if n_packed == 0:
        return fail(summary, "no packed linear weights")
    if lin_max != 0.0 or other_max != 0.0:
        return fail(summary, f"mismatch: linear max abs diff {lin_max} (worst {worst}), others {other_max}")
    summary["ok"] = True
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
