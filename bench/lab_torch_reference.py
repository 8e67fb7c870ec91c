#!/usr/bin/env python3
"""PyTorch CPU reference for `pma train` / `pma eval` throughput.

Builds the identical model with transformers (LlamaForCausalLM or MixtralForCausalLM, byte vocab
256, untied head), trains it with AdamW (0.9/0.95, wd 0.1, clip 1.0) on random windows of the
embedded corpus at the same batch and sequence length, and times an eval pass over the validation
split (last 5%), in windows of --seq tokens.

    python3 bench/lab_torch_reference.py --layers 4 --hidden 128 --heads 4 --batch 16 --seq 128 --steps 10 --threads 2

Compare with `bench/lab_bench.sh` (same arguments). Runs only where torch and transformers are
installed; exits 0 with a message elsewhere.
"""
import argparse
import math
import os
import sys
import time

try:
    import torch
    import transformers
except ImportError:
    print("skipped: torch and transformers are not installed", file=sys.stderr)
    sys.exit(0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--moe", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    inter = -(-(8 * a.hidden // 3) // 32) * 32
    common = dict(vocab_size=256, hidden_size=a.hidden, intermediate_size=inter, num_hidden_layers=a.layers,
                  num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=a.seq,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    if a.moe:
        cfg = transformers.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, output_router_logits=True,
                                         router_aux_loss_coef=0.02, **common)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    model.train()
    n_params = sum(x.numel() for x in model.parameters())
    data = open(os.path.join(ROOT, "data", "moby-dick.txt"), "rb").read()
    tokens = torch.tensor(list(data), dtype=torch.long)
    cut = len(tokens) - round(len(tokens) * 0.05)
    train, val = tokens[:cut], tokens[cut:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    t_start = None
    for step in range(a.steps):
        if step == 1:
            t_start = time.perf_counter()
        starts = torch.randint(0, len(train) - a.seq - 1, (a.batch,), generator=g)
        w = torch.stack([train[s:s + a.seq + 1] for s in starts])
        out = model(input_ids=w[:, :-1], labels=w[:, :-1].clone())  # HF shifts labels itself
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_secs = time.perf_counter() - t_start
    train_tps = (a.steps - 1) * a.batch * a.seq / train_secs
    model.eval()
    n_win = len(val) // a.seq
    windows = val[: n_win * a.seq].view(n_win, a.seq)
    t0 = time.perf_counter()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, n_win, a.batch):
            w = windows[i:i + a.batch]
            logits = model(input_ids=w[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            n += w[:, 1:].numel()
    eval_secs = time.perf_counter() - t0
    kind = "moe" if a.moe else "dense"
    print(f"torch {torch.__version__} threads {a.threads} model {kind} params {n_params} L{a.layers} H{a.hidden} "
          f"A{a.heads} B{a.batch} T{a.seq}: train {train_tps:.0f} tokens/s (loss {loss.item():.4f} after {a.steps} steps)")
    print(f"eval {n / eval_secs:.0f} tokens/s ({n} tokens, val_loss {total / n:.4f})")


if __name__ == "__main__":
    main()
