"""Writes a small run of torch.save checkpoints with torch itself, for the watch tests.

usage: make_torch_run.py RUN_DIR N LAYOUT
  LAYOUT hf:        step-000N00/pytorch_model.bin + config.json, vocab.txt, 1_Pooling/config.json,
                    and training state (optimizer.pt, trainer_state.json) that must not travel
  LAYOUT deepspeed: global_stepN00/mp_rank_00_model_states.pt ({'module': state_dict, ...});
                    the run's `latest` file is left to the test

Values depend only on the step, so reruns write the same tensors.
"""
import json
import os
import sys

import torch


def state_dict(step):
    g = torch.Generator().manual_seed(step)
    return {
        "model.embed.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.w": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        # A transposed view: stored with its own strides.
        "model.layers.0.v": torch.randn(6, 4, generator=g).t(),
        "model.pos": torch.arange(4, dtype=torch.int64),
    }


def main():
    run, n, layout = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    for i in range(1, n + 1):
        step = 100 * i
        sd = state_dict(step)
        if layout == "hf":
            d = os.path.join(run, f"step-{step:07d}")
            os.makedirs(os.path.join(d, "1_Pooling"), exist_ok=True)
            torch.save(sd, os.path.join(d, "pytorch_model.bin"))
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({"model_type": "bert", "torch_dtype": "float32"}, f)
            with open(os.path.join(d, "vocab.txt"), "w") as f:
                f.write("[PAD]\n[UNK]\nhello\n")
            with open(os.path.join(d, "1_Pooling", "config.json"), "w") as f:
                json.dump({"pooling_mode_mean_tokens": True}, f)
            torch.save({"state": {}, "param_groups": []}, os.path.join(d, "optimizer.pt"))
            with open(os.path.join(d, "trainer_state.json"), "w") as f:
                json.dump({"global_step": step}, f)
        elif layout == "deepspeed":
            d = os.path.join(run, f"global_step{step}")
            os.makedirs(d, exist_ok=True)
            torch.save(
                {"module": sd, "global_steps": step},
                os.path.join(d, "mp_rank_00_model_states.pt"),
            )
        else:
            raise SystemExit(f"unknown layout {layout}")


main()
