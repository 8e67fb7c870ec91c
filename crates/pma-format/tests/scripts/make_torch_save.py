"""Writes torch.save checkpoints with real torch, and the expected bytes of every tensor.

usage: make_torch_save.py OUT_DIR

OUT_DIR/bin/pytorch_model.bin                   plain HF state dict
OUT_DIR/sharded/pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json
OUT_DIR/deepspeed/mp_rank_00_model_states.pt    {'module': sd, ...}: a view with a storage offset
                                                sharing its storage, a transposed tensor, a scalar,
                                                beside non-tensor leaves (ints, an argparse.Namespace)
OUT_DIR/megatron/model_optim_rng.pt             {'model': {'language_model': {...}}, 'args': ...}
OUT_DIR/legacy.pt                               the pre-1.6 (non-zip) format
OUT_DIR/expected.json                           {checkpoint: {name: [dtype, shape, raw file]}}
Raw files hold each tensor's contiguous little-endian bytes (bf16 as its 16-bit pattern).
"""
import argparse, collections, json, os, sys
import torch

out = sys.argv[1]
torch.manual_seed(0)
expected = {}


def raw(t, ckpt, name):
    t = t.detach().contiguous()
    st = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
          torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}[t.dtype]
    b = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    fn = f"{ckpt.replace('/', '_')}__{name}.raw"
    with open(os.path.join(out, fn), "wb") as f:
        f.write(b.numpy().tobytes())
    expected.setdefault(ckpt, {})[name] = [st, list(t.shape), fn]


def save(obj, rel, flat, **kw):
    p = os.path.join(out, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    torch.save(obj, p, **kw)
    for k, v in flat.items():
        raw(v, rel, k)


sd = collections.OrderedDict()
sd["embed.weight"] = torch.randn(10, 6).to(torch.bfloat16)
sd["layer.0.w"] = torch.randn(6, 6)
sd["layer.0.b"] = torch.randn(6).half()
sd["ids"] = torch.arange(7)
save(sd, "bin/pytorch_model.bin", sd)

a = {k: sd[k] for k in ["embed.weight", "layer.0.w"]}
b = {k: sd[k] for k in ["layer.0.b", "ids"]}
save(a, "sharded/pytorch_model-00001-of-00002.bin", a)
save(b, "sharded/pytorch_model-00002-of-00002.bin", b)
with open(os.path.join(out, "sharded/pytorch_model.bin.index.json"), "w") as f:
    wm = {k: "pytorch_model-00001-of-00002.bin" for k in a}
    wm.update({k: "pytorch_model-00002-of-00002.bin" for k in b})
    json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
expected["sharded"] = {k: v for k, v in expected["sharded/pytorch_model-00001-of-00002.bin"].items()}
expected["sharded"].update(expected["sharded/pytorch_model-00002-of-00002.bin"])

base = torch.randn(4, 5)
module = collections.OrderedDict()
module["full.weight"] = base
module["view.weight"] = base[1:3]          # storage offset 5, same storage as full.weight
module["row.weight"] = base[2]             # a 1-d view at offset 10
module["t.weight"] = torch.randn(3, 8).to(torch.bfloat16).t()  # strides (1, 8)
module["col.weight"] = base[:, 1]          # stride (5,), offset 1
module["scalar"] = torch.tensor(3.5, dtype=torch.float64)
module["mask"] = torch.tensor([True, False, True])
ds = {"module": module, "optimizer": None, "global_steps": 10, "lr_scheduler": {"x": 1},
      "args": argparse.Namespace(lr=0.1, name="run"), "ds_version": "0.14.0"}
save(ds, "deepspeed/mp_rank_00_model_states.pt", module)

lm = {"embedding": {"word_embeddings": {"weight": torch.randn(5, 4)}},
      "encoder": {"layers.0.mlp.weight": torch.randn(4, 4).to(torch.bfloat16)}}
meg = {"model": {"language_model": lm}, "args": argparse.Namespace(tp=1), "iteration": 100,
       "checkpoint_version": 3.0, "rng_state": [{"random_rng_state": (3, (1, 2), None)}]}
save(meg, "megatron/model_optim_rng.pt", {
    "language_model.embedding.word_embeddings.weight": lm["embedding"]["word_embeddings"]["weight"],
    "language_model.encoder.layers.0.mlp.weight": lm["encoder"]["layers.0.mlp.weight"]})

torch.save(sd, os.path.join(out, "legacy.pt"), _use_new_zipfile_serialization=False)
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
