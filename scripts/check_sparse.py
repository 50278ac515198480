#!/usr/bin/env python3
"""Check a compressed-tensors `sparse-bitmask` folder with the compressed-tensors package.

Usage:
    check_sparse.py DENSE_DIR [SPARSE_DIR]

DENSE_DIR holds the dense pruned model (model.safetensors or shards, bf16); SPARSE_DIR
(default DENSE_DIR/sparse) its sparse-bitmask form written by prune::sparse. Checks, with
compressed-tensors' own code (its sparse compressors exist up to 0.14; scripts/check_sparse.sh
puts that version on the path):

1. config.json's `quantization_config` loads through ModelCompressor.from_pretrained into a
   sparse-bitmask compressor and no quantization;
2. stored dtypes: `.bitmask` U8, `.row_offsets` and `.shape` I64, `.compressed` the dense
   weight's dtype; `.row_offsets` (which the decompressor does not read) agree with the
   bitmask, and `.compressed` holds one value per set bit;
3. the model-free decompressor (BitmaskCompressor.decompress on the folder) gives back every
   dense tensor bit for bit, streamed one tensor at a time (a -0.0 in the dense weights comes
   back as +0.0, as `tensor != 0` defines the mask: counted, not a mismatch);
4. the config's targets/ignore, matched against the model built from config.json on the meta
   device, select exactly the compressed linears (ModelCompressor.get_missing_module_keys /
   get_unexpected_file_keys, which transformers uses when loading);
5. for models whose dense file is under CHECK_SPARSE_MODEL_GB (default 2) GB:
   ModelCompressor.decompress into a transformers model built from the config, and every
   parameter of its state dict equals the dense tensor.

Prints one JSON line on stdout; exit 0 when everything matches, 1 on a mismatch or a failed
check, 2 on bad usage.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json
import sys
from pathlib import Path

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = ("bitmask", "compressed", "row_offsets", "shape")


def log(msg: str) -> None:
    print(f"check_sparse: {msg}", file=sys.stderr, flush=True)


def fail(summary: dict, msg: str) -> int:
    summary["ok"] = False
    summary["error"] = msg
    log(msg)
    print(json.dumps(summary))
    return 1


def safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [d / "model.safetensors"]


class Dense:
    """The dense tensors, opened lazily, one at a time."""

    def __init__(self, d: Path):
        from safetensors import safe_open

        self.handles = [safe_open(str(f), "pt") for f in safetensors_files(d)]
        self.where = {n: h for h in self.handles for n in h.keys()}

    def names(self) -> set[str]:
        return set(self.where)

    def dtype(self, name: str) -> str:
        return self.where[name].get_slice(name).get_dtype()

    def get(self, name: str):
        return self.where[name].get_tensor(name)


def compare(name: str, got, want) -> tuple[bool, int]:
    """Bit-exact comparison; returns (equal, signed zeros that differ only in sign)."""
    import torch

    if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
        return False, 0
    if not got.is_floating_point():
        return bool(torch.equal(got, want)), 0
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    gb, wb = got.view(ints), want.view(ints)
    differ = gb != wb
    # -0.0 vs +0.0 is the format's (documented) normalisation, not a mismatch.
    signed_zero = differ & (got == 0) & (want == 0)
    return not bool((differ & ~signed_zero).any()), int(signed_zero.sum())


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    dense_dir = Path(argv[0])
    sparse_dir = Path(argv[1]) if len(argv) == 2 else dense_dir / "sparse"
    summary: dict = {"dense": str(dense_dir), "sparse": str(sparse_dir)}
    for f in (sparse_dir / "model.safetensors", sparse_dir / "config.json", dense_dir / "config.json", *safetensors_files(dense_dir)):
        if not f.is_file():
            return fail(summary, f"missing {f}")

    import torch
    import compressed_tensors
    from compressed_tensors.compressors import BitmaskCompressor, ModelCompressor
    from safetensors import safe_open

    summary["compressed_tensors"] = compressed_tensors.__version__
    summary["torch"] = torch.__version__

    # 1. The config, through compressed-tensors' own parser.
    qc = json.loads((sparse_dir / "config.json").read_text()).get("quantization_config") or {}
    sc = qc.get("sparsity_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or sc.get("format") != "sparse-bitmask":
        return fail(summary, "config.json has no compressed-tensors sparse-bitmask sparsity_config")
    try:
        mc = ModelCompressor.from_pretrained(str(sparse_dir))
    except Exception as e:  # noqa: BLE001 - report whatever was raised
        return fail(summary, f"ModelCompressor.from_pretrained failed: {type(e).__name__}: {e}")
    if mc is None or not isinstance(mc.sparsity_compressor, BitmaskCompressor) or mc.quantization_config is not None:
        return fail(summary, f"ModelCompressor did not load a bitmask compressor alone: {mc!r}")
    summary["sparsity_config"] = mc.sparsity_config.model_dump()

    # 2. Stored dtypes.
    dense = Dense(dense_dir)
    with safe_open(str(sparse_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        modules = sorted(n[: -len(".bitmask")] for n in names if n.endswith(".bitmask"))
        for m in modules:
            want = {"bitmask": "U8", "row_offsets": "I64", "shape": "I64", "compressed": dense.dtype(f"{m}.weight")}
            for part, dt in want.items():
                n = f"{m}.{part}"
                if n not in names:
                    return fail(summary, f"missing {n}")
                if f.get_slice(n).get_dtype() != dt:
                    return fail(summary, f"{n} is {f.get_slice(n).get_dtype()}, expected {dt}")
        # compressed-tensors' decompressor ignores row_offsets: check them against the bitmask
        # (index of each row's first value, i.e. the exclusive cumulative sum of row counts).
        from compressed_tensors.utils import unpack_bitmasks

        for m in modules:
            shape = f.get_tensor(f"{m}.shape").tolist()
            counts = unpack_bitmasks(f.get_tensor(f"{m}.bitmask"), shape).sum(dim=-1)
            if not torch.equal(f.get_tensor(f"{m}.row_offsets"), torch.cumsum(counts, 0) - counts):
                return fail(summary, f"{m}.row_offsets do not match the bitmask")
            if f.get_slice(f"{m}.compressed").get_shape() != [int(counts.sum())]:
                return fail(summary, f"{m}.compressed does not hold one value per set bit")
    if not modules:
        return fail(summary, "no compressed linears")
    if any(m.rpartition(".")[2] not in LINEARS for m in modules):
        return fail(summary, f"unexpected compressed modules: {[m for m in modules if m.rpartition('.')[2] not in LINEARS][:5]}")

    # 3. Model-free decompression, tensor by tensor.
    seen, signed_zeros, bad = set(), 0, []
    nonzeros = params = 0
    try:
        for name, t in mc.sparsity_compressor.decompress(str(sparse_dir)):
            if name in seen:
                return fail(summary, f"{name} decompressed twice")
            seen.add(name)
            if name not in dense.where:
                return fail(summary, f"decompressed {name} is not in the dense model")
            ok, sz = compare(name, t, dense.get(name))
            signed_zeros += sz
            if not ok:
                bad.append(name)
            if name[: -len(".weight")] in modules:
                params += t.numel()
                nonzeros += int((t != 0).sum())
    except Exception as e:  # noqa: BLE001
        return fail(summary, f"compressed-tensors could not decompress {sparse_dir}: {type(e).__name__}: {e}")
    if seen != dense.names():
        return fail(summary, f"tensor names differ: only sparse {sorted(seen - dense.names())[:5]}, only dense {sorted(dense.names() - seen)[:5]}")
    summary.update(
        {
            "tensors": len(seen),
            "linears": len(modules),
            "linear_params": params,
            "linear_nonzeros": nonzeros,
            "linear_sparsity": round(1 - nonzeros / params, 6),
            "signed_zeros_normalised": signed_zeros,
            "dense_bytes": sum(p.stat().st_size for p in safetensors_files(dense_dir)),
            "sparse_bytes": (sparse_dir / "model.safetensors").stat().st_size,
        }
    )
    summary["size_ratio"] = round(summary["sparse_bytes"] / summary["dense_bytes"], 4)
    if bad:
        return fail(summary, f"{len(bad)} tensors differ after decompression, e.g. {bad[:5]}")

    # 4. Targets and ignore select exactly the compressed linears.
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(dense_dir))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    missing = set(mc.get_missing_module_keys(meta))
    unexpected = set(mc.get_unexpected_file_keys(meta))
    want_missing = {f"{m}.weight" for m in modules}
    want_unexpected = {f"{m}.{p}" for m in modules for p in PARTS}
    if missing != want_missing or unexpected != want_unexpected:
        return fail(
            summary,
            f"targets/ignore select other modules: missing-key diff {sorted(missing ^ want_missing)[:5]}, "
            f"unexpected-key diff {sorted(unexpected ^ want_unexpected)[:5]}",
        )
    summary["targets_match"] = True

    # 5. Decompression into a model, for small models.
    limit = float(os.environ.get("CHECK_SPARSE_MODEL_GB", "2")) * 2**30
    if summary["dense_bytes"] > limit:
        summary["model_decompress"] = "skipped (dense model over CHECK_SPARSE_MODEL_GB)"
    else:
        dtype = dense.get(f"{modules[0]}.weight").dtype
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        try:
            mc.decompress(str(sparse_dir), model)
        except Exception as e:  # noqa: BLE001
            return fail(summary, f"ModelCompressor.decompress into the model failed: {type(e).__name__}: {e}")
        state = model.state_dict()
        bad = [n for n in dense.names() if n not in state or not compare(n, state[n], dense.get(n))[0]]
        if bad:
            return fail(summary, f"{len(bad)} model parameters differ after ModelCompressor.decompress, e.g. {bad[:5]}")
        summary["model_decompress"] = f"{len(dense.names())} parameters equal"

    summary["ok"] = True
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
