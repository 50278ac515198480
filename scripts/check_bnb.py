#!/usr/bin/env python3
"""Check a `compress quant --scheme nf4|fp4|int8-absmax --format dense,bnb` output with
bitsandbytes and HF transformers on the CPU.

Usage:
    check_bnb.py DIR [BNB_DIR] [--teacher HF_DIR] [--tokens N]

DIR holds the dense model (bf16), BNB_DIR (default DIR/bnb) the bitsandbytes one. Checks:
1. bitsandbytes runs here (a 4-bit round trip on a small CPU tensor); if not, exit 3 with the
   reason.
2. Every quantized linear: `QuantState.from_dict` on its stored tensors, then
   `bitsandbytes.functional.dequantize_4bit`, must equal the dense weight bit for bit (both
   bf16); `quant_map` must be bitsandbytes' table and `nested_quant_map` its dynamic map.
3. With --teacher (an HF folder of the unquantized model in f32, e.g. from `compress convert
   MODEL DIR --dtype f32`): bitsandbytes' own `quantize_4bit` of each teacher weight gives
   the same codes and absmax as ours. Reported, not failed: FP4 codes that differ only in
   the sign of zero (same value), and double-quantized absmax codes, which may differ where
   torch's mean of the absmax values (the offset) differs from ours in the last bit.
4. `AutoModelForCausalLM.from_pretrained(BNB_DIR)` on the CPU (every decoder linear a
   bitsandbytes `Linear4bit`) against the dense folder loaded in bf16: logits on N tokens of
   a fixed text (max |diff|, top-1 agreement, perplexity of each).

For int8-absmax (`load_in_8bit`) the same four checks use the 8-bit functions: each `weight`
(I8) and `SCB` through `int8_vectorwise_dequant`, the teacher through `int8_vectorwise_quant`
(codes that differ only at exact half-step ties reported, not failed), and the loaded model's
linears are `Linear8bitLt` holding our codes and row scales. LLM.int8 quantizes activations
too, so its logits meet only a loose bound against the dense folder (top-1 agreement >= 0.9,
perplexity within 10%); with --teacher the perplexity of the teacher quantized on load by
transformers (`load_in_8bit`) is reported beside it.

Prints one JSON line on stdout; exit 0 when everything matches, 1 on a mismatch, 2 on bad
usage, 3 when bitsandbytes cannot run on this machine.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json
import sys
from pathlib import Path

TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the "
    "tallest structure in Paris. Its base is square, measuring 125 metres on each side. During "
    "its construction, the Eiffel Tower surpassed the Washington Monument to become the tallest "
    "man-made structure in the world, a title it held for 41 years until the Chrysler Building "
    "in New York City was finished in 1930. It was the first structure to reach a height of 300 "
    "metres. Due to the addition of a broadcasting aerial at the top of the tower in 1957, it is "
    "now taller than the Chrysler Building by 5.2 metres."
)


def log(msg: str) -> None:
    print(f"check_bnb: {msg}", file=sys.stderr, flush=True)


def finish(summary: dict, code: int, msg: str | None = None) -> int:
    summary["ok"] = code == 0
    if msg:
        summary["error"] = msg
        log(msg)
    print(json.dumps(summary))
    return code


def main(argv: list[str]) -> int:
    args, teacher, tokens = [], None, 128
    it = iter(argv)
    for a in it:
        if a == "--teacher":
            teacher = Path(next(it, ""))
        elif a == "--tokens":
            tokens = int(next(it, "128"))
        elif a in ("-h", "--help") or a.startswith("-"):
            print(__doc__, file=sys.stderr)
            return 2
        else:
            args.append(a)
    if len(args) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    dense_dir = Path(args[0])
    bnb_dir = Path(args[1]) if len(args) == 2 else dense_dir / "bnb"
    summary: dict = {"dense": str(dense_dir), "bnb": str(bnb_dir)}
    for f in (dense_dir / "model.safetensors", bnb_dir / "model.safetensors", bnb_dir / "config.json"):
        if not f.is_file():
            return finish(summary, 2, f"missing {f}")

    import torch
    from safetensors.torch import load_file

    # 1. Does bitsandbytes run on this CPU?
    try:
        import bitsandbytes
        import bitsandbytes.functional as F

        x = torch.randn(4, 64)
        q, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        err = (F.dequantize_4bit(q, st) - x).abs().max().item()
        if not err < 0.5:
            raise RuntimeError(f"4-bit round trip error {err}")
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot run"
        return finish(summary, 3, f"bitsandbytes cannot run on this machine: {type(e).__name__}: {e}")
    summary["versions"] = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
    }

    qc = json.loads((bnb_dir / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "bitsandbytes" or not (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        return finish(summary, 1, f"config.json: not a bitsandbytes quantization_config: {qc}")
    bnb = load_file(str(bnb_dir / "model.safetensors"))
    dense = load_file(str(dense_dir / "model.safetensors"))
    mismatched: list[str] = []
    if qc.get("load_in_8bit"):
        summary["quant_type"] = "int8"
        modules = check_int8(F, bnb, dense, teacher, summary, mismatched)
        linear_class = bitsandbytes.nn.Linear8bitLt
    else:
        modules = check_4bit(F, qc, bnb, dense, teacher, summary, mismatched)
        linear_class = bitsandbytes.nn.Linear4bit
    if isinstance(modules, str):
        return finish(summary, 1, modules)
    for k, v in dense.items():
        if k.endswith(".weight") and k[: -len(".weight")] not in modules:
            if not torch.equal(bnb[k], v):
                return finish(summary, 1, f"{k}: differs between the bnb and dense files")

    # 4. transformers loads the bnb folder; logits against the dense folder.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        mb = AutoModelForCausalLM.from_pretrained(str(bnb_dir), device_map="cpu")
    except Exception as e:  # noqa: BLE001
        return finish(summary, 1, f"transformers cannot load {bnb_dir}: {type(e).__name__}: {e}")
    nq = sum(isinstance(mod, linear_class) for mod in mb.modules())
    summary["quantized_modules_loaded"] = nq
    if nq != len(modules):
        mismatched.append(f"{nq} {linear_class.__name__} modules loaded, {len(modules)} in the file")
    if summary["quant_type"] == "int8":
        # The loaded Linear8bitLt modules must hold our codes and row scales.
        wrong = []
        for name, mod in mb.named_modules():
            if isinstance(mod, linear_class):
                scb = getattr(mod.weight, "SCB", None)
                if scb is None:
                    scb = mod.state.SCB
                if not (torch.equal(mod.weight.data, bnb[f"{name}.weight"]) and torch.equal(scb.view(-1), bnb[f"{name}.SCB"])):
                    wrong.append(name)
        summary["loaded_modules_holding_other_codes"] = wrong[:5]
        if wrong:
            mismatched.append(f"{len(wrong)} loaded Linear8bitLt modules hold other codes or SCB")
    md = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.bfloat16, device_map="cpu")
    tok = AutoTokenizer.from_pretrained(str(dense_dir))
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        lb = mb(ids).logits.float()[0]
        ld = md(ids).logits.float()[0]

    def ppl(logits: torch.Tensor) -> float:
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
        return float(torch.exp(nll))

    diff = (lb - ld).abs()
    summary["tokens"] = int(ids.shape[1])
    summary["logits_max_abs_diff"] = diff.max().item()
    summary["logits_mean_abs_diff"] = diff.mean().item()
    summary["top1_agreement"] = float((lb.argmax(-1) == ld.argmax(-1)).float().mean())
    summary["ppl_bnb"] = ppl(lb)
    summary["ppl_dense"] = ppl(ld)
    # LLM.int8 also quantizes activations at inference (int8, outlier columns in fp16), so an
    # 8-bit model's logits differ from the dense folder's: only a loose bound applies there;
    # with --teacher the perplexity of bitsandbytes' own 8-bit teacher is reported beside it.
    int8 = summary["quant_type"] == "int8"
    top1, rel = (0.9, 0.1) if int8 else (0.99, 0.005)
    if summary["top1_agreement"] < top1 or abs(summary["ppl_bnb"] / summary["ppl_dense"] - 1) > rel:
        mismatched.append("logits of the bnb model differ from the dense model's")
    if int8 and teacher is not None:
        from transformers import BitsAndBytesConfig

        mt = AutoModelForCausalLM.from_pretrained(
            str(teacher), quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.bfloat16, device_map="cpu"
        )
        with torch.no_grad():
            summary["ppl_teacher_load_in_8bit"] = ppl(mt(ids).logits.float()[0])
    if mismatched:
        return finish(summary, 1, f"mismatches: {mismatched[:5]}")
    return finish(summary, 0)


def check_4bit(F, qc, bnb, dense, teacher, summary, mismatched):
    """Checks 2 and 3 for nf4/fp4; returns the quantized modules or an error message."""
    import torch
    from safetensors.torch import load_file

    qtype = qc.get("bnb_4bit_quant_type")
    summary["quant_type"] = qtype
    summary["double_quant"] = qc.get("bnb_4bit_use_double_quant")
    suffix = f".weight.quant_state.bitsandbytes__{qtype}"
    modules = sorted(k[: -len(suffix)] for k in bnb if k.endswith(suffix))
    if not modules:
        return f"no `*{suffix}` tensors"
    dyn = F.create_dynamic_map()
    table = F.get_4bit_type(qtype, device="cpu")
    worst, blocksize, bad = 0.0, None, []
    for m in modules:
        pre = f"{m}.weight."
        qs = {k[len(pre):]: v for k, v in bnb.items() if k.startswith(pre)}
        state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
        blocksize = state.blocksize
        if not torch.equal(state.code, table):
            return f"{m}: quant_map differs from bitsandbytes' {qtype} table"
        if state.nested and not torch.equal(state.state2.code, dyn):
            return f"{m}: nested_quant_map differs from bitsandbytes' dynamic map"
        got = F.dequantize_4bit(bnb[f"{m}.weight"], state)
        want = dense[f"{m}.weight"]
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"{m}: {tuple(got.shape)} {got.dtype} vs dense {tuple(want.shape)} {want.dtype}"
        worst = max(worst, (got.float() - want.float()).abs().max().item())
        if not torch.equal(got, want):
            bad.append(m)
    summary["linears"] = len(modules)
    summary["blocksize"] = blocksize
    summary["dequantize_max_abs_diff"] = worst
    summary["dequantize_mismatched"] = bad[:5]
    mismatched.extend(bad[:5])

    # 3. bitsandbytes' own quantization of the teacher's weights.
    if teacher is not None:
        tw = load_file(str(teacher / "model.safetensors"))
        code_diff, zero_sign, absmax_diff, total = 0, 0, 0, 0
        for m in modules:
            w = tw[f"{m}.weight"].float()
            q, st = F.quantize_4bit(
                w, blocksize=blocksize, quant_type=qtype, compress_statistics=bool(qc.get("bnb_4bit_use_double_quant"))
            )
            ours = bnb[f"{m}.weight"]
            a, b = q.view(-1), ours.view(-1)
            ca = torch.stack([a >> 4, a & 15], -1).view(-1).long()
            cb = torch.stack([b >> 4, b & 15], -1).view(-1).long()
            differ = ca != cb
            # FP4 has +0 (code 0) and -0 (code 8): bitsandbytes' CPU path picks either for
            # values near zero (its CUDA kernel picks by sign); we always write +0. Same value.
            same_value = table[ca] == table[cb]
            zero_sign += int((differ & same_value).sum())
            code_diff += int((differ & ~same_value).sum())
            total += ca.numel()
            absmax_diff += int((st.absmax.view(-1) != bnb[f"{m}.weight.absmax"].view(-1)).sum())
        summary["teacher_codes_differing"] = code_diff
        summary["teacher_codes_total"] = total
        summary["teacher_codes_differing_only_in_the_sign_of_zero"] = zero_sign
        summary["teacher_absmax_differing"] = absmax_diff
        if code_diff:
            mismatched.append(f"{code_diff} of {total} codes differ from bitsandbytes' quantize_4bit")
        if absmax_diff and not summary["double_quant"]:
            mismatched.append(f"{absmax_diff} absmax values differ from bitsandbytes' quantize_4bit")
    return modules


def check_int8(F, bnb, dense, teacher, summary, mismatched):
    """Checks 2 and 3 for int8-absmax (`Linear8bitLt`'s `weight`, `SCB`, `weight_format`)."""
    import torch
    from safetensors.torch import load_file

    modules = sorted(k[: -len(".SCB")] for k in bnb if k.endswith(".SCB"))
    if not modules:
        return "no `*.SCB` tensors"
    worst, bad = 0.0, []
    for m in modules:
        cb, scb = bnb[f"{m}.weight"], bnb[f"{m}.SCB"]
        if cb.dtype != torch.int8 or scb.dtype != torch.float32 or scb.shape != (cb.shape[0],):
            return f"{m}: weight {cb.dtype} {tuple(cb.shape)}, SCB {scb.dtype} {tuple(scb.shape)}"
        wf = bnb.get(f"{m}.weight_format")
        if wf is None or wf.dtype != torch.uint8 or wf.numel() != 1 or int(wf) != 0:
            return f"{m}: weight_format is not the uint8 scalar 0 (row-major)"
        got = F.int8_vectorwise_dequant(cb, scb).to(torch.bfloat16)
        want = dense[f"{m}.weight"]
        if got.shape != want.shape:
            return f"{m}: {tuple(got.shape)} vs dense {tuple(want.shape)}"
        worst = max(worst, (got.float() - want.float()).abs().max().item())
        if not torch.equal(got, want):
            bad.append(m)
    summary["linears"] = len(modules)
    summary["dequantize_max_abs_diff"] = worst
    summary["dequantize_mismatched"] = bad[:5]
    mismatched.extend(bad[:5])
    if teacher is not None:
        tw = load_file(str(teacher / "model.safetensors"))
        code_diff, ties, scb_diff, total = 0, 0, 0, 0
        for m in modules:
            w = tw[f"{m}.weight"].float()
            q, st, _ = F.int8_vectorwise_quant(w.clone())
            differ = q != bnb[f"{m}.weight"]
            # torch's CPU kernel gets 127 / absmax a last bit away from the correctly rounded
            # quotient we use, so a weight at exactly half a step (w * 127 / absmax = k + 0.5
            # in exact arithmetic) rounds the other way. Same value otherwise.
            exact = w.double() * 127.0 / st.double().unsqueeze(1)
            tie = (exact - exact.floor() - 0.5).abs() < 1e-9
            ties += int((differ & tie).sum())
            code_diff += int((differ & ~tie).sum())
            scb_diff += int((st != bnb[f"{m}.SCB"]).sum())
            total += q.numel()
        summary["teacher_codes_differing"] = code_diff
        summary["teacher_codes_differing_only_at_exact_ties"] = ties
        summary["teacher_codes_total"] = total
        summary["teacher_scb_differing"] = scb_diff
        if code_diff or scb_diff:
            mismatched.append(f"{code_diff} codes / {scb_diff} SCB differ from int8_vectorwise_quant")
    return modules


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
