"""PyTorch's side of the training-speed comparison in scripts/bench/distill.sh.

Full fine-tuning steps of an HF Llama folder in f32 on the CPU, set up as `compress distill
--loss ce` trains: AdamW (weight decay 0), cross-entropy on one window of SEQ+1 tokens (the
model reads SEQ, predicts SEQ), global gradient norm clipped to 1.0. Prints one JSON line:
per-step seconds, the median of the steps after the first (warm-up) and tokens/s from it,
and the process's peak RSS.
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM


def window(model_dir, data, seq, seed, vocab):
    """SEQ+1 token ids: the start of DATA tokenized with the model's tokenizer, else random."""
    if data:
        tok = AutoTokenizer.from_pretrained(model_dir)
        with open(data, encoding="utf-8") as f:
            text = f.read(16 * seq)  # about 4 characters per token: ample for SEQ+1
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > seq:
            return torch.tensor(ids[: seq + 1]).unsqueeze(0), "data"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, seq + 1), generator=g), "random"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF folder (config.json, safetensors, tokenizer)")
    ap.add_argument("--data", help="text whose first tokens form the window (default: random ids)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    # `dtype` is transformers' current name for `torch_dtype`.
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.train()
    ids, source = window(a.model, a.data, a.seq_len, a.seed, model.config.vocab_size)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)

    secs, losses = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inp).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        secs.append(time.perf_counter() - t0)
        losses.append(loss.item())

    steady = secs[1:] or secs
    med = statistics.median(steady)
    print(json.dumps({
        "tool": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "threads": torch.get_num_threads(),
        "seq_len": a.seq_len,
        "tokens_per_step": a.seq_len,
        "tokens": source,
        "steps": a.steps,
        "step_secs": [round(s, 4) for s in secs],
        "losses": [round(x, 4) for x in losses],
        "median_secs": round(med, 4),
        "tokens_per_second": round(a.seq_len / med, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
