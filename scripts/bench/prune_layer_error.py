#!/usr/bin/env python3
"""Per-linear reconstruction error of two pruned students on the same inputs.

    prune_layer_error.py --teacher HF_DIR --calib-ids FILE.json --layer L --a DIR --b DIR

Runs the f32 teacher (HF transformers, CPU) on the calibration windows up to decoder layer L,
takes every linear's inputs there (the unpruned teacher's, so both students are judged on
the same inputs), and prints for each linear of that layer the relative output error
tr((W - W0) H (W - W0)^T) / tr(W0 H W0^T), H = sum of x x^T, of student A and student B, their
ratio and the agreement of their zero masks. Used to tell a per-layer algorithmic difference
(one tool consistently worse on the same inputs) from drift that builds up through the layers.
Needs torch, transformers and safetensors (the peer venv of scripts/bench/peer_lib.sh).
"""

import argparse
import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


class _Stop(Exception):
    pass


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--calib-ids", required=True)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--a", required=True, help="student A (HF folder)")
    p.add_argument("--b", required=True, help="student B (HF folder)")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ids = json.load(open(a.calib_ids))
    model = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32)
    model.eval()
    if not 0 <= a.layer < len(model.model.layers):
        raise SystemExit(f"error: --layer {a.layer} is not a layer of {a.teacher}")
    layer = model.model.layers[a.layer]
    hess = {}

    def capture(name):
        def hook(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            hess[name] = hess.get(name, 0) + x.T @ x
        return hook

    for n in LINEARS:
        layer.get_submodule(n).register_forward_pre_hook(capture(n))

    def stop(_mod, _args, _out):
        raise _Stop()

    layer.register_forward_hook(stop)
    with torch.no_grad():
        for w in ids:
            try:
                model(torch.tensor([w]))
            except _Stop:
                pass
    sa = load_file(f"{a.a}/model.safetensors")
    sb = load_file(f"{a.b}/model.safetensors")
    print(f"layer {a.layer}, {len(ids)} windows: A = {a.a}, B = {a.b}")
    for n in LINEARS:
        key = f"model.layers.{a.layer}.{n}.weight"
        w0 = layer.get_submodule(n).weight.double()
        h = hess[n]

        def err(w):
            d = w.double() - w0
            return (torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w0, h, w0)).item()

        ea, eb = err(sa[key]), err(sb[key])
        agree = ((sa[key] == 0) == (sb[key] == 0)).double().mean().item()
        print(f"{n:18s} A {ea:.6f}  B {eb:.6f}  A/B {ea / eb:.4f}  mask agreement {agree:.4f}")


if __name__ == "__main__":
    main()
