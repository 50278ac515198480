#!/usr/bin/env python3
"""Peer quantization for the benchmark: llm-compressor's RTN, GPTQ or AWQ on exactly the
calibration tokens our `compress quant ... --dump-calib FILE.json` drew.

    peer_quant.py --model HF_DIR --calib-ids FILE.json --method rtn|gptq|awq \
                  --bits 4 --group 64 [--sym] [--actorder static] --out DIR

HF_DIR is a dense HF folder (`compress convert MODEL.gguf HF_DIR --dtype f32`), loaded with
transformers on the CPU in float32. FILE.json is a list of token-id lists, used as it is: one
window per batch, in file order, no tokenization or shuffling. The quantized model is saved in
compressed-tensors' pack-quantized layout (what vLLM loads; `compress eval DIR` reads it), with
DIR/peer_report.json (settings, versions, wall time).

Run it with the peer virtualenv's python (scripts/bench/peer_lib.sh: peer_venv).

llm-compressor settings, all its defaults except the scheme: integer weights, `group`
strategy with --group columns per scale, asymmetric unless --sym, every Linear of the decoder
blocks (lm_head ignored: tied to the embeddings here, and ours leaves it too); GPTQ
dampening_frac 0.01, block_size 128, actorder None unless --actorder (passed to GPTQModifier
itself: its own default, "static", overrides a scheme's None); AWQ its default
mappings and duo scaling; pipeline "sequential" for the calibrated methods.
"""

import argparse
import json
import os
import shutil
import sys
import time

from peer_common import copy_tokenizer, load_ids, versions



def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="dense HF folder (the teacher)")
    p.add_argument("--calib-ids", help="JSON list of token-id lists (gptq, awq)")
    p.add_argument("--method", required=True, choices=["rtn", "gptq", "awq"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--actorder", choices=["static", "group"], default=None, help="gptq only")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.method != "rtn" and not a.calib_ids:
        p.error(f"--method {a.method} needs --calib-ids")
    if a.actorder and a.method != "gptq":
        p.error("--actorder applies to --method gptq only")
    return a




def main():
    a = parse_args()
    ids = load_ids(a.calib_ids) if a.calib_ids else None
    t_start = time.time()
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from transformers import AutoModelForCausalLM

    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if not torch.cuda.is_available():
        # AWQ pins its cached activations for host-to-GPU copies; with PyPI's CUDA build of
        # torch on a machine without an NVIDIA driver, pin_memory() raises. Pinning changes
        # no value, only transfer speed, so on a CPU-only machine it is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, device_map=None)
    model.eval()

    weights = QuantizationArgs(
        num_bits=a.bits, type="int", symmetric=a.sym, strategy="group", group_size=a.group,
        actorder=a.actorder,
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    common = dict(config_groups=groups, ignore=["lm_head"])
    if a.method == "rtn":
        modifier = QuantizationModifier(**common)
    elif a.method == "gptq":
        # GPTQModifier's own `actorder` defaults to "static" and overrides a scheme's None:
        # pass ours explicitly, or the "no act-order" row would be static act-order.
        modifier = GPTQModifier(**common, actorder=a.actorder)
    else:
        modifier = AWQModifier(**common)

    kwargs = {}
    if ids is not None:
        from datasets import Dataset
        from torch.utils.data import DataLoader
        from transformers import default_data_collator

        ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(w) for w in ids]})
        kwargs = dict(
            dataset=DataLoader(ds, batch_size=1, shuffle=False, collate_fn=default_data_collator),
            pipeline="sequential",
        )
    t0 = time.time()
    oneshot(model=model, recipe=modifier, **kwargs)
    t_quant = time.time() - t0

    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    model.save_pretrained(a.out, save_compressed=True)
    copy_tokenizer(a.model, a.out)
    t_total = time.time() - t_start

    import llmcompressor

    report = {
        "tool": "llmcompressor",
        "versions": versions(),
        "teacher": a.model,
        "method": a.method,
        "scheme": weights.model_dump(exclude_none=True, mode="json"),
        "calibration": None if ids is None else {
            "file": a.calib_ids, "windows": len(ids), "tokens": sum(len(w) for w in ids)},
        "quant_wall_seconds": t_quant,
        "total_wall_seconds": t_total,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(a.out, "peer_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"llmcompressor {llmcompressor.__version__} {a.method} W{a.bits} g{a.group} "
          f"{'sym' if a.sym else 'asym'} actorder {a.actorder}: quant wall {t_quant:.1f} s, "
          f"total {t_total:.1f} s; wrote {a.out}")


if __name__ == "__main__":
    main()
