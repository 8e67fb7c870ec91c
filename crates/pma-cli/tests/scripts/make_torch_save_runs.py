"""Writes three small training runs of torch.save checkpoints with real torch, and their exact
merges computed by tools/reference_merge.py from safetensors copies of the same state dicts.

usage: make_torch_save_runs.py OUT_DIR REFERENCE_MERGE_PY

OUT_DIR/hf/checkpoint-{100,200,300}/pytorch_model.bin (+ config.json)   HF Trainer, older style
OUT_DIR/ds/global_step{100,200,300}/mp_rank_00_model_states.pt (+ latest)
        DeepSpeed: weights under 'module', beside an 'optimizer' entry, scheduler and step
        counters, and a separate zero_pp_rank_0_mp_rank_00_optim_states.pt
OUT_DIR/views/step-{100,200,300}/pytorch_model.bin
        tensors that are views of one shared storage: a storage offset (rows 1..3), a transposed
        view, a strided column, and the base itself
OUT_DIR/ref/<run>-{sma,ema0.2}.safetensors    reference merges of the model weights, oldest first
"""
import collections, json, os, subprocess, sys
import torch
from safetensors.torch import save_file

out, reference_merge = sys.argv[1], sys.argv[2]
STEPS = [100, 200, 300]
torch.manual_seed(0)


def model(step):
    sd = collections.OrderedDict()
    sd["embed.weight"] = torch.randn(10, 6).to(torch.bfloat16)
    sd["layers.0.w"] = torch.randn(6, 6)
    sd["layers.0.b"] = torch.randn(6).half()
    sd["norm.weight"] = torch.randn(6, dtype=torch.float64)
    sd["position_ids"] = torch.arange(7)  # identical in every step: copied
    return sd


def views():
    base = torch.randn(4, 5)
    sd = collections.OrderedDict()
    sd["rows"] = base[1:3]          # storage offset 5
    sd["transposed"] = base.t()     # strides (1, 5)
    sd["column"] = base[:, 2]       # offset 2, stride 5
    sd["base"] = base
    return sd


def save(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path)


def reference_copy(sd, run, step):
    path = os.path.join(out, "ref", run, f"step-{step}.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, path)
    return path


refs = collections.defaultdict(list)
for step in STEPS:
    sd = model(step)
    d = os.path.join(out, "hf", f"checkpoint-{step}")
    save(sd, os.path.join(d, "pytorch_model.bin"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "toy"}, f)
    refs["hf"].append(reference_copy(sd, "hf", step))

    sd = model(step)
    optim = {"state": {i: {"exp_avg": torch.randn(3), "step": torch.tensor(float(step))}
                       for i in range(2)},
             "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}
    d = os.path.join(out, "ds", f"global_step{step}")
    save({"module": sd, "optimizer": optim, "lr_scheduler": {"last_epoch": step},
          "global_steps": step, "buffer_names": ["position_ids"], "ds_version": "0.14.0"},
         os.path.join(d, "mp_rank_00_model_states.pt"))
    save({"optimizer_state_dict": optim}, os.path.join(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    refs["ds"].append(reference_copy(sd, "ds", step))

    sd = views()
    save(sd, os.path.join(out, "views", f"step-{step}", "pytorch_model.bin"))
    refs["views"].append(reference_copy(sd, "views", step))
with open(os.path.join(out, "ds", "latest"), "w") as f:
    f.write(f"global_step{STEPS[-1]}")

for run, paths in refs.items():
    for method, name in [("sma", "sma"), ("ema:0.2", "ema0.2")]:
        target = os.path.join(out, "ref", f"{run}-{name}.safetensors")
        subprocess.check_call([sys.executable, reference_merge, method, target, *paths],
                              stdout=subprocess.DEVNULL)
