"""Exact merge of the float tensors under a key prefix of DCP checkpoints, read by torch itself.

usage: dcp_state_reference.py OUT_DIR REFERENCE_MERGE_PY METHOD PREFIX CKPT [CKPT ...]

Each checkpoint (oldest first) is loaded with a plain `dcp.load` (FileSystemReader), its float
tensor entries whose key starts with PREFIX are saved as OUT_DIR/member-<i>.safetensors, and
tools/reference_merge.py merges those into OUT_DIR/reference.safetensors. Used to check that
`pma merge --include 'optimizer.*'` averages optimizer state exactly.
"""
import os, subprocess, sys, warnings
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
out_dir, reference_merge, method, prefix, *ckpts = sys.argv[1:]
members = []
for i, ckpt in enumerate(ckpts):
    md = FileSystemReader(ckpt).read_metadata()
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
          for k, m in md.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata) and k.startswith(prefix)
          and m.properties.dtype.is_floating_point}
    dcp.load(sd, checkpoint_id=ckpt, no_dist=True)
    path = os.path.join(out_dir, f"member-{i}.safetensors")
    save_file(sd, path)
    members.append(path)
subprocess.check_call([sys.executable, reference_merge, method,
                       os.path.join(out_dir, "reference.safetensors"), *members],
                      stdout=subprocess.DEVNULL)
