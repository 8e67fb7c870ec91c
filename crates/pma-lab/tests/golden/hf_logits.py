#!/usr/bin/env python3
"""Loads a lab checkpoint with transformers and prints its logits and loss on given token ids.

    python3 hf_logits.py CKPT_DIR '[67, 97, 108, ...]'

prints {"logits": [[...] per position], "loss": mean next-token CE, "versions": "..."} on stdout.
Used by crates/pma-lab/tests/transformers.rs.
"""
import json
import sys

import torch
import transformers


def main():
    ckpt, tokens = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.tensor([tokens], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    print(json.dumps({
        "architecture": type(model).__name__,
        "logits": out.logits[0].tolist(),
        "loss": out.loss.item(),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }))


if __name__ == "__main__":
    main()
