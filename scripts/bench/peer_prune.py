#!/usr/bin/env python3
"""Peer pruning for the benchmark: llm-compressor's SparseGPT or Wanda on exactly the
calibration tokens our `compress prune ... --dump-calib FILE.json` drew.

    peer_prune.py --model HF_DIR --calib-ids FILE.json --method sparsegpt|wanda \
                  (--sparsity S | --pattern N:M) --out DIR

HF_DIR is a dense HF folder (`compress convert MODEL.gguf HF_DIR --dtype f32`). The model
is loaded with transformers on the CPU in float32; FILE.json is a list of lists of token
ids, used as they are: no tokenization, no shuffling, one window per batch, in file order.
The pruned model is written to DIR as a plain dense HF folder (config.json,
model.safetensors in float32, tokenizer files) that `compress eval DIR` reads; the
measured sparsity of the decoder linears and the wall time are printed, and saved to
DIR/peer_report.json.

Run it with the peer virtualenv's python (scripts/bench/peer_lib.sh: peer_venv).

llm-compressor (0.14) settings, all its defaults except the ones we must set:
  * targets ["Linear"] with ignore ["re:.*lm_head"]: every Linear of the decoder blocks
    (q/k/v/o_proj, gate/up/down_proj); lm_head is skipped (it is tied to the embeddings
    in SmolLM2, and our tool does not prune it either).
  * pipeline "sequential" (inferred for calibrated modifiers): one decoder layer at a
    time; the calibration activations of layer i+1 are those of the already-pruned
    layers 0..i, as in our layer-by-layer engine.
  * SparseGPT: dampening_frac 0.01 (of the mean Hessian diagonal), block_size 128
    (columns per lazy-update block; 576-wide inputs give blocks of 128,128,128,128,64),
    preserve_sparsity_mask False, offload_hessians False. Its unstructured mask is chosen
    per 128-column block across all rows (threshold on w^2/[H^-1]_jj^2), so a block gets
    int(rows*cols*s)+1 zeros (ties aside), not exactly s per row.
  * Wanda: score |W| * sqrt(mean ||x_j||^2); unstructured masks int(cols*s) weights per
    output row (per-output comparison group, as in the paper).
  * N:M: llm-compressor's mask_structure "N:M" prunes N of every M consecutive input
    weights; ours (`--pattern N:M`) keeps N of M. We translate: ours N:M -> "(M-N):M"
    (2:4 and 4:8 are the same either way). The `sparsity` value is not used by either
    modifier for N:M masks; we pass (M-N)/M for the record.
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
    p.add_argument("--calib-ids", required=True, help="JSON list of lists of token ids")
    p.add_argument("--method", required=True, choices=["sparsegpt", "wanda"])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1)")
    g.add_argument("--pattern", help="N:M, keep N of every M consecutive input weights (our convention)")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args()




def decoder_linears(model):
    import torch

    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}" and "lm_head" not in name
    ]


def measure(model, nm=None):
    """Zeros in the decoder linears: overall, per projection kind, and (for N:M) the
    fraction of M-groups along the input dimension with at most N nonzeros."""
    import torch

    total = zeros = 0
    kinds = {}
    groups = groups_ok = 0
    for name, m in decoder_linears(model):
        w = m.weight.detach()
        z = int((w == 0).sum())
        total += w.numel()
        zeros += z
        k = name.rsplit(".", 1)[-1]
        a = kinds.setdefault(k, [0, 0])
        a[0] += z
        a[1] += w.numel()
        if nm is not None:
            n, mm = nm
            if w.shape[1] % mm == 0:
                nz = (w != 0).reshape(w.shape[0], -1, mm).sum(dim=-1)
                groups += nz.numel()
                groups_ok += int((nz <= n).sum())
    out = {
        "linear_params": total,
        "linear_zeros": zeros,
        "linear_sparsity": zeros / max(total, 1),
        "by_kind": {k: v[0] / v[1] for k, v in sorted(kinds.items())},
    }
    if nm is not None:
        out["nm_groups"] = groups
        out["nm_groups_ok"] = groups_ok
    del torch
    return out


def main():
    a = parse_args()
    if a.sparsity is not None:
        if not (0.0 <= a.sparsity < 1.0):
            sys.exit("error: --sparsity must be in [0, 1)")
        nm = None
        sparsity = a.sparsity
        mask_structure = "0:0"  # unstructured
    else:
        try:
            n, m = (int(x) for x in a.pattern.split(":"))
        except ValueError:
            sys.exit(f"error: --pattern {a.pattern!r}: expected N:M")
        if not (0 < n < m):
            sys.exit(f"error: --pattern {a.pattern}: need 0 < N < M")
        nm = (n, m)
        sparsity = (m - n) / m
        mask_structure = f"{m - n}:{m}"  # llm-compressor counts the pruned weights
    ids = load_ids(a.calib_ids)

    t_start = time.time()
    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, default_data_collator

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, device_map=None)
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(max(w) for w in ids) >= vocab:
        sys.exit(f"error: {a.calib_ids}: a token id is >= the vocabulary size {vocab}")
    before = measure(model, nm)

    # The calibration set: the dumped windows, untouched. A pre-built DataLoader is
    # used as it is by oneshot (no tokenization, sampling, shuffling or truncation);
    # passing the datasets.Dataset itself also works (it has `input_ids`, so oneshot
    # skips tokenization), but then its LengthAwareSampler reorders windows (argsort
    # of equal lengths) and num_calibration_samples / max_seq_length apply.
    ds = Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(w) for w in ids]}
    )
    loader = DataLoader(ds, batch_size=1, shuffle=False, collate_fn=default_data_collator)

    common = dict(
        sparsity=sparsity,
        mask_structure=mask_structure,
        targets=["Linear"],
        ignore=["re:.*lm_head"],
    )
    if a.method == "sparsegpt":
        # Defaults kept: dampening_frac=0.01, block_size=128.
        modifier = SparseGPTModifier(**common)
    else:
        modifier = WandaPruningModifier(**common)

    t0 = time.time()
    oneshot(model=model, dataset=loader, recipe=modifier, pipeline="sequential")
    t_prune = time.time() - t0

    after = measure(model, nm)

    # Save a plain dense folder: save_compressed=False keeps dense weights; llm-compressor
    # still writes a `quantization_config` (sparsity_config format "dense", plus its
    # version), which we move aside so the folder is an ordinary dense checkpoint.
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    model.save_pretrained(a.out, save_compressed=False)
    cfg_path = os.path.join(a.out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    qc = cfg.pop("quantization_config", None)
    if qc is not None:
        with open(os.path.join(a.out, "llmc_quantization_config.json"), "w") as f:
            json.dump(qc, f, indent=2)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
    copy_tokenizer(a.model, a.out)
    t_total = time.time() - t_start

    import llmcompressor

    report = {
        "tool": "llmcompressor",
        "versions": versions(),
        "teacher": a.model,
        "method": a.method,
        "pattern": a.pattern or f"unstructured {sparsity}",
        "mask_structure": mask_structure,
        "modifier": modifier.model_dump(exclude_none=True, mode="json"),
        "calibration": {"file": a.calib_ids, "windows": len(ids), "tokens": sum(len(w) for w in ids)},
        "teacher_linear_sparsity": before["linear_sparsity"],
        **after,
        "prune_wall_seconds": t_prune,
        "total_wall_seconds": t_total,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(a.out, "peer_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)

    print(f"llmcompressor {llmcompressor.__version__} {a.method} mask_structure {mask_structure} "
          f"sparsity {sparsity:g} on {len(ids)} x {len(ids[0])} tokens, {torch.get_num_threads()} threads")
    print(f"decoder linear sparsity {after['linear_sparsity']:.4f} "
          f"({after['linear_zeros']}/{after['linear_params']}; teacher {before['linear_sparsity']:.4f})")
    print("by kind: " + ", ".join(f"{k} {v:.4f}" for k, v in after["by_kind"].items()))
    if nm is not None:
        print(f"{a.pattern} groups satisfied: {after['nm_groups_ok']}/{after['nm_groups']}")
    print(f"prune wall {t_prune:.1f} s, total wall {t_total:.1f} s; wrote {a.out}")


if __name__ == "__main__":
    main()
