#!/usr/bin/env python3
"""Check a structurally pruned HF folder (`compress prune --structured`) in transformers.

Usage:
    check_hf_structured.py MODEL_DIR [--text FILE] [--max-tokens N]
                           [--expect-ppl X] [--rtol R]

Checks, in order, failing with exit 1 on the first problem:
 1. every layer's tensors in model.safetensors have the shapes config.json implies
    (q/o from num_attention_heads * head_dim, k/v from num_key_value_heads * head_dim,
    the MLP from intermediate_size, exactly num_hidden_layers layers), read from the
    safetensors header without transformers;
 2. LlamaForCausalLM loads the folder with no missing, unexpected or mismatched keys
    (check_hf_load.load_model), and its config has the same head_dim;
 3. the parameter count transformers sees equals params_after of prune_report.json;
 4. with --text: the perplexity of the first N tokens (check_hf_load.perplexity, every
    token scored: `compress eval --protocol hf --ctx N --chunks 1`) is within --rtol
    (default 5e-4) of --expect-ppl when given.

Prints one JSON line on stdout: {"params": P, "ppl": X or null, "expect_ppl": Y or null}.
Requires torch, transformers, safetensors (scripts/check_hf_structured.sh sets up the venv).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_hf_load as base  # noqa: E402  (sets the offline environment on import)


def log(msg: str) -> None:
    print(f"check_hf_structured: {msg}", file=sys.stderr, flush=True)


def expected_shapes(cfg: dict) -> dict[str, list[int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out[p + "self_attn.q_proj.weight"] = [heads * hd, h]
        out[p + "self_attn.k_proj.weight"] = [kv * hd, h]
        out[p + "self_attn.v_proj.weight"] = [kv * hd, h]
        out[p + "self_attn.o_proj.weight"] = [h, heads * hd]
        out[p + "mlp.gate_proj.weight"] = [i, h]
        out[p + "mlp.up_proj.weight"] = [i, h]
        out[p + "mlp.down_proj.weight"] = [h, i]
    return out


def check_shapes(model_dir: Path) -> dict:
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    want = expected_shapes(cfg)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        have = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    layers = {int(k.split(".")[2]) for k in have if k.startswith("model.layers.")}
    if layers != set(range(cfg["num_hidden_layers"])):
        raise base.CheckError(
            f"layers in the file {sorted(layers)} != num_hidden_layers {cfg['num_hidden_layers']}"
        )
    for name, shape in want.items():
        if have.get(name) != shape:
            raise base.CheckError(f"{name}: shape {have.get(name)} in the file, config implies {shape}")
    log(
        f"shapes match config: layers={cfg['num_hidden_layers']} heads={cfg['num_attention_heads']}"
        f"/{cfg.get('num_key_value_heads')} head_dim={cfg.get('head_dim')} "
        f"intermediate={cfg['intermediate_size']}"
    )
    return cfg


def run(args) -> dict:
    cfg = check_shapes(args.model_dir)
    torch, model, tok, n_params = base.load_model(args.model_dir)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    hf_hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    if hf_hd != hd:
        raise base.CheckError(f"transformers uses head_dim {hf_hd}, the config means {hd}")
    report = args.model_dir / "prune_report.json"
    if report.is_file():
        after = json.loads(report.read_text()).get("params_after")
        if after is not None and after != n_params:
            raise base.CheckError(f"transformers counts {n_params} params, prune_report.json says {after}")
    result = {"params": n_params, "ppl": None, "expect_ppl": args.expect_ppl}
    if args.text is not None:
        ppl, _ = base.perplexity(torch, model, tok, args.text, args.max_tokens)
        result["ppl"] = ppl
        if args.expect_ppl is not None:
            rel = abs(ppl - args.expect_ppl) / args.expect_ppl
            log(f"transformers ppl {ppl:.4f} vs ours {args.expect_ppl:.4f}: relative difference {rel:.2e}")
            if rel > args.rtol:
                raise base.CheckError(f"perplexity differs by {rel:.2e} > {args.rtol}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--text", type=Path, help="UTF-8 text file to score")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--expect-ppl", type=float, help="our perplexity on the same tokens")
    ap.add_argument("--rtol", type=float, default=5e-4)
    args = ap.parse_args(argv)
    if args.expect_ppl is not None and args.text is None:
        ap.error("--expect-ppl needs --text")
    try:
        result = run(args)
    except base.CheckError as e:
        print(f"check_hf_structured: FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
