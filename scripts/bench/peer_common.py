"""What the peer scripts (peer_prune.py, peer_quant.py) share: the calibration token file,
the tokenizer files copied beside a saved model, and the versions a report records."""

import json
import os
import shutil
import sys

TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
]


def load_ids(path):
    """The token file `compress ... --dump-calib` writes: a non-empty list of non-empty lists
    of non-negative token ids."""
    with open(path) as f:
        ids = json.load(f)
    if not isinstance(ids, list) or not ids or not all(isinstance(w, list) and w for w in ids):
        sys.exit(f"error: {path}: expected a non-empty JSON list of non-empty lists of token ids")
    for w in ids:
        if not all(isinstance(t, int) and t >= 0 for t in w):
            sys.exit(f"error: {path}: token ids must be non-negative integers")
    return ids


def copy_tokenizer(src_dir, out_dir):
    """Copies the tokenizer files of `src_dir` that `out_dir` lacks."""
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and not os.path.exists(os.path.join(out_dir, name)):
            shutil.copy(src, os.path.join(out_dir, name))


def versions():
    """The peer stack's versions, for a report."""
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers

    return {
        "llmcompressor": llmcompressor.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
