#!/usr/bin/env python3
"""Check that a converted Hugging Face Llama folder loads in transformers.

Usage:
    check_hf_load.py MODEL_DIR [--text FILE] [--max-tokens N]
    check_hf_load.py --selftest [--keep DIR]

MODEL_DIR must hold config.json, model.safetensors, tokenizer.json,
tokenizer_config.json and generation_config.json (what our converter writes).
The model is loaded with LlamaForCausalLM.from_pretrained(..., float32) and
the tokenizer with AutoTokenizer.from_pretrained, fully offline. The check
fails if the class is not LlamaForCausalLM, or if any checkpoint tensor is
missing, unexpected or mis-shaped (transformers would otherwise silently
random-initialise missing weights).

With --text, the first N tokens (default 512) of FILE, tokenized with the
folder's tokenizer and its default special tokens (BOS if the tokenizer.json
post-processor adds one), are scored in a single window: every token after the
first is predicted (N-1 predictions), as in the Hugging Face perplexity guide.

Prints one JSON line on stdout: {"params": P, "ppl": X or null, "tokens": N}
("tokens" is the window length N; N-1 tokens are scored). Diagnostics go to
stderr. Exit 0 on success, 1 on a failed check, 2 on bad usage.

--selftest builds a tiny random Llama folder the way the converter should
(hand-written config/tokenizer JSON, plain safetensors file) in a temp dir,
checks it, and compares its logits with the in-memory model.

Requires: torch, transformers, safetensors, tokenizers (scripts/check_hf_load.sh
installs them into a venv).
"""

from __future__ import annotations

import os

# Must be set before transformers / huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

REQUIRED_FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
]


class CheckError(Exception):
    pass


def log(msg: str) -> None:
    print(f"check_hf_load: {msg}", file=sys.stderr, flush=True)


def import_libs():
    try:
        import torch
        import transformers
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError as e:
        raise CheckError(
            f"cannot import torch/transformers ({e}); run scripts/check_hf_load.sh, "
            "which installs them into a venv"
        ) from e
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers, AutoTokenizer, LlamaForCausalLM


def dtype_kwarg(transformers, torch) -> dict:
    # transformers >= 4.56 renamed torch_dtype= to dtype= (the old name warns in v5).
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}


def load_model(model_dir: Path):
    torch, transformers, AutoTokenizer, LlamaForCausalLM = import_libs()
    log(f"torch {torch.__version__}, transformers {transformers.__version__}")

    if not model_dir.is_dir():
        raise CheckError(f"{model_dir} is not a directory")
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise CheckError(f"{model_dir} lacks {', '.join(missing)}")
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckError(f"config.json is not valid JSON: {e}") from e
    if cfg.get("model_type") != "llama":
        raise CheckError(f'config.json model_type is {cfg.get("model_type")!r}, expected "llama"')
    if "LlamaForCausalLM" not in (cfg.get("architectures") or []):
        raise CheckError(f'config.json architectures is {cfg.get("architectures")!r}, expected ["LlamaForCausalLM"]')

    try:
        model, info = LlamaForCausalLM.from_pretrained(
            str(model_dir),
            local_files_only=True,
            output_loading_info=True,
            **dtype_kwarg(transformers, torch),
        )
    except Exception as e:  # transformers raises many types; report them all clearly
        raise CheckError(f"LlamaForCausalLM.from_pretrained failed: {type(e).__name__}: {e}") from e
    if type(model) is not LlamaForCausalLM:
        raise CheckError(f"loaded class is {type(model).__name__}, expected LlamaForCausalLM")
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        vals = info.get(key) or []
        if vals:
            vals = sorted(str(v) for v in vals)
            problems.append(f"{key} ({len(vals)}): {', '.join(vals[:8])}{' ...' if len(vals) > 8 else ''}")
    if problems:
        raise CheckError("checkpoint does not match the model: " + "; ".join(problems))
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if bad:
        raise CheckError(f"parameters not float32 after load: {bad[:5]}")
    model.eval()

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise CheckError(f"AutoTokenizer.from_pretrained failed: {type(e).__name__}: {e}") from e
    if len(tok) > model.config.vocab_size:
        raise CheckError(f"tokenizer has {len(tok)} tokens but config vocab_size is {model.config.vocab_size}")

    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    c = model.config
    log(
        f"loaded {type(model).__name__}: {n_params} params, layers={c.num_hidden_layers} "
        f"hidden={c.hidden_size} heads={c.num_attention_heads}/{c.num_key_value_heads} "
        f"vocab={c.vocab_size} tied={c.tie_word_embeddings}; tokenizer {type(tok).__name__} "
        f"({len(tok)} tokens, bos={tok.bos_token!r}, eos={tok.eos_token!r})"
    )
    return torch, model, tok, n_params


def perplexity(torch, model, tok, text_path: Path, max_tokens: int) -> tuple[float, int]:
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckError(f"cannot read --text {text_path}: {e}") from e
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[:, :max_tokens]
    n = ids.shape[1]
    if n < 2:
        raise CheckError(f"--text {text_path} gives {n} token(s); need at least 2")
    if n < max_tokens:
        log(f"note: text has only {n} tokens (< --max-tokens {max_tokens})")
    if n > model.config.max_position_embeddings:
        log(f"note: window {n} > max_position_embeddings {model.config.max_position_embeddings}")
    if int(ids.max()) >= model.config.vocab_size:
        raise CheckError(f"token id {int(ids.max())} >= vocab_size {model.config.vocab_size}")
    bos = tok.bos_token_id is not None and int(ids[0, 0]) == tok.bos_token_id
    log(f"scoring {n - 1} of {n} tokens (first token {'is' if bos else 'is not'} BOS)")
    with torch.no_grad():
        # labels == input_ids: the model shifts internally, mean NLL over n-1 predictions.
        loss = model(input_ids=ids, labels=ids).loss
    nll = float(loss)
    if not math.isfinite(nll):
        raise CheckError(f"loss is not finite ({nll})")
    return math.exp(nll), n


def run_check(model_dir: Path, text: Path | None, max_tokens: int) -> dict:
    torch, model, tok, n_params = load_model(model_dir)
    result = {"params": n_params, "ppl": None, "tokens": 0}
    if text is not None:
        ppl, n = perplexity(torch, model, tok, text, max_tokens)
        result["ppl"] = ppl
        result["tokens"] = n
    return result


# --------------------------------------------------------------------------- selftest


def write_tiny_model(out: Path):
    """Write a tiny Llama folder the way the Rust converter is expected to.

    Returns the in-memory model so logits can be compared after reloading.
    """
    torch, transformers, _, LlamaForCausalLM = import_libs()
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Compression of large language models trades accuracy for size.",
        "Perplexity measures how well a model predicts a sample of text.",
    ] * 20
    specials = ["<unk>", "<s>", "</s>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    bos_id, eos_id = tk.token_to_id("<s>"), tk.token_to_id("</s>")
    # BOS is added by the tokenizer.json post-processor, not by tokenizer_config.json.
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tk.save(str(out / "tokenizer.json"))
    vocab_size = tk.get_vocab_size()

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_id, "eos_token_id": eos_id}, indent=2)
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": cfg["max_position_embeddings"],
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # make norms non-trivial so a missed norm tensor would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "sample.txt").write_text(" ".join(corpus[:3]) * 4)
    return torch, model, tk


def selftest(keep: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d = keep or Path(tmp) / "tiny-llama"
        torch, ref, tk = write_tiny_model(d)
        log(f"selftest: wrote tiny model to {d}: {sorted(p.name for p in d.iterdir())}")
        result = run_check(d, d / "sample.txt", 64)
        _, model, tok, _ = load_model(d)
        ids = tok("The quick brown fox", return_tensors="pt").input_ids
        if ids[0].tolist() != tk.encode("The quick brown fox").ids:
            raise CheckError("AutoTokenizer ids differ from the tokenizers library's")
        if int(ids[0, 0]) != tk.token_to_id("<s>"):
            raise CheckError("BOS was not prepended by the tokenizer")
        with torch.no_grad():
            diff = (model(ids).logits - ref(ids).logits).abs().max().item()
        if diff > 1e-5:
            raise CheckError(f"reloaded logits differ from the in-memory model by {diff}")
        if not (1.0 < result["ppl"] < 2 * tk.get_vocab_size()):
            raise CheckError(f"implausible selftest perplexity {result['ppl']}")
        log(f"selftest: OK (logit max diff {diff:.2e})")
        return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Load a converted HF Llama folder with transformers and optionally score perplexity.",
        epilog='Prints one JSON line: {"params": P, "ppl": X|null, "tokens": N}.',
    )
    ap.add_argument("model_dir", nargs="?", type=Path, help="HF model folder")
    ap.add_argument("--text", type=Path, help="UTF-8 text file to score")
    ap.add_argument("--max-tokens", type=int, default=512, help="window length N (default 512)")
    ap.add_argument("--selftest", action="store_true", help="build and check a tiny random model")
    ap.add_argument("--keep", type=Path, help="with --selftest: write the tiny model here and keep it")
    args = ap.parse_args(argv)
    if args.selftest == (args.model_dir is not None):
        ap.error("give exactly one of MODEL_DIR or --selftest")
    if args.max_tokens < 2:
        ap.error("--max-tokens must be >= 2")

    try:
        if args.selftest:
            result = selftest(args.keep)
        else:
            result = run_check(args.model_dir, args.text, args.max_tokens)
    except CheckError as e:
        print(f"check_hf_load: FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
