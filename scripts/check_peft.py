"""Checks that `compress distill --lora-save both` writes adapters HF PEFT loads: the base
model with the adapters (PeftModel) gives the logits of our merged output.
Usage: python scripts/check_peft.py BASE_HF_DIR OUT_DIR  (OUT_DIR/adapter holds the adapters)"""
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base_dir, out_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
ids = torch.randint(0, 1000, (1, 64))
base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
peft = PeftModel.from_pretrained(base, f"{out_dir}/adapter").eval()
ours = AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
plain = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
with torch.no_grad():
    a, b, c = peft(ids).logits, ours(ids).logits, plain(ids).logits
diff = (a - b).abs().max().item()
moved = (b - c).abs().max().item()
print(f"check_peft: max |PEFT - merged| = {diff:.2e}, adapters moved logits by {moved:.2e}")
sys.exit(0 if diff < 1e-3 and moved > 1e-2 else 1)
