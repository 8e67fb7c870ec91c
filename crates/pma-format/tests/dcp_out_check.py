#!/usr/bin/env python3
"""Checks pma's DCP output with real torch (stock FileSystemReader), for tests/dcp_out.rs.

usage:
  dcp_out_check.py load OUT SRC.safetensors [OUT SRC.safetensors ...] [--ranks N]
      dcp.load(OUT) into empty tensors of SRC's shapes and dtypes; every tensor must equal SRC bit
      for bit, and OUT must hold no other entry. --ranks N also loads the first OUT into Shard(0)
      DTensors on N gloo ranks (a resharding load, as a trainer with another parallelism does).
      Several pairs per call, because importing torch is the slow part.
  dcp_out_check.py items CKPT OUT.json OUT_MODEL.safetensors
      describes CKPT's .metadata as JSON (every entry in order: fqn, kind, model or not, dtype,
      shape, chunks with their file/offset/length, planner path) and writes its model tensors,
      loaded with dcp.load, to a safetensors file.
  dcp_out_check.py same OUT CKPT
      dcp.load both checkpoints in full (tensors and bytes objects); every entry must be equal.
  dcp_out_check.py raw-same OUT CKPT
      like `same`, but bytes items are compared as raw bytes, not loaded: Megatron writes some
      raw (not torch.save payloads), which dcp.load cannot read but Megatron's loader can.
Exit 0 = OK; anything else prints what differs. Needs only torch (no numpy, no safetensors).
"""
import io, json, os, struct, sys, tempfile, warnings, zipfile

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402
from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: E402

ST2TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
            "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
            "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
TORCH2ST = {v: k for k, v in ST2TORCH.items()}
NON_MODEL = {"optimizer", "optim", "train_state", "dataloader", "lr_scheduler", "scheduler"}


def raw(t):
    """Little-endian bytes of a tensor (no numpy)."""
    t = t.detach().contiguous().reshape(-1)
    return bytes(t.view(torch.uint8).tolist()) if t.numel() else b""


def read_safetensors(path):
    with open(path, "rb") as f:
        b = f.read()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        out[k] = (v["dtype"], tuple(v["shape"]), b[8 + n + s:8 + n + e])
    return out


def write_safetensors(path, tensors):
    header, data = {}, bytearray()
    for k, t in tensors.items():
        r = raw(t)
        header[k] = {"dtype": TORCH2ST[t.dtype], "shape": list(t.shape),
                     "data_offsets": [len(data), len(data) + len(r)]}
        data += r
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(data))


def cmd_load(pairs, ranks):
    bad = 0
    for i in range(0, len(pairs), 2):
        out, src = pairs[i], pairs[i + 1]
        problems = load_one(out, src, ranks if i == 0 else 0)
        print(f"{'OK' if not problems else 'FAIL'}: {out} vs {src}: {problems} problems")
        bad += problems
    return 1 if bad else 0


def load_one(out, src, ranks):
    ref = read_safetensors(src)
    md = FileSystemReader(out).read_metadata()
    bad = 0
    for k in sorted(set(md.state_dict_metadata) - set(ref)):
        print(f"EXTRA   {k}")
        bad += 1
    # Every item is a valid zip on its own: Python's zipfile re-reads each entry and checks its
    # CRC-32 (the one the writer patches into the local header after streaming).
    for idx, si in md.storage_data.items():
        with open(os.path.join(out, si.relative_path), "rb") as f:
            f.seek(si.offset)
            item = f.read(si.length)
        broken = zipfile.ZipFile(io.BytesIO(item)).testzip()
        if broken is not None:
            print(f"BADZIP  {idx.fqn}: entry {broken}")
            bad += 1
    sd = {k: torch.empty(shape, dtype=ST2TORCH[dt]) for k, (dt, shape, _) in ref.items()}
    dcp.load(sd, checkpoint_id=out, no_dist=True)
    for k, (dt, shape, r) in ref.items():
        if raw(sd[k]) != r:
            print(f"DIFFER  {k}")
            bad += 1
    if ranks:
        bad += dtensor_load(out, ref, ranks)
    return bad


def _dtensor_worker(rank, world, init_file, out, meta, result):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        sd = {}
        for k, (dt, size) in meta.items():
            t = torch.zeros(size, dtype=ST2TORCH[dt])
            sd[k] = distribute_tensor(t, mesh, [Shard(0)]) if len(size) else t
        dcp.load(sd, checkpoint_id=out)
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in sd.items()}
        if rank == 0:
            torch.save(full, result)
        dist.barrier()  # no rank may tear gloo down while another still uses it
    finally:
        dist.destroy_process_group()


def dtensor_load(out, ref, world):
    import torch.multiprocessing as mp
    meta = {k: (dt, shape) for k, (dt, shape, _) in ref.items()}
    with tempfile.TemporaryDirectory(prefix="dcp-out-check-") as tmp:
        result = os.path.join(tmp, "full.pt")
        mp.spawn(_dtensor_worker, args=(world, os.path.join(tmp, "store"), out, meta, result),
                 nprocs=world, join=True)
        full = torch.load(result)
    bad = [k for k, (_, _, r) in ref.items() if raw(full[k]) != r]
    for k in bad:
        print(f"DIFFER  {k} (DTensor load on {world} ranks)")
    return len(bad)


def is_model(fqn):
    return fqn.split(".", 1)[0] not in NON_MODEL


def cmd_items(ckpt, out_json, out_model):
    md = FileSystemReader(ckpt).read_metadata()
    index = {}
    for idx, si in md.storage_data.items():
        off = tuple(idx.offset) if idx.offset is not None else None
        index[(idx.fqn, off)] = si
    entries, model = [], {}
    for fqn, m in md.state_dict_metadata.items():
        path = list((md.planner_data or {}).get(fqn, (fqn,)))
        if isinstance(m, TensorStorageMetadata):
            chunks = []
            for c in m.chunks:
                si = index[(fqn, tuple(c.offsets))]
                chunks.append({"offsets": list(c.offsets), "sizes": list(c.sizes),
                               "file": si.relative_path, "offset": si.offset,
                               "length": si.length})
            entries.append({"fqn": fqn, "kind": "tensor", "model": is_model(fqn),
                            "dtype": TORCH2ST[m.properties.dtype], "shape": list(m.size),
                            "chunks": chunks, "planner_path": path})
            if is_model(fqn):
                model[fqn] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        else:
            si = index[(fqn, None)]
            entries.append({"fqn": fqn, "kind": "bytes", "model": False, "file": si.relative_path,
                            "offset": si.offset, "length": si.length, "planner_path": path})
    dcp.load(model, checkpoint_id=ckpt, no_dist=True)
    write_safetensors(out_model, model)
    with open(out_json, "w") as f:
        json.dump(entries, f)
    return 0


def load_all(path):
    md = FileSystemReader(path).read_metadata()
    sd = {}
    for k, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            sd[k] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        else:
            sd[k] = None  # the load planner replaces it with torch.load(item bytes)
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    return sd


def nested_keys(path):
    """Paths of the leaves of the nested dict dcp_to_torch_save rebuilds from planner_data."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory(prefix="dcp-out-check-") as tmp:
        dcp_to_torch_save(path, os.path.join(tmp, "full.pt"))
        obj = torch.load(os.path.join(tmp, "full.pt"), weights_only=False)
    leaves = set()

    def walk(x, prefix):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, prefix + (k,))
        elif isinstance(x, list) and prefix[-1:] == ("param_groups",):
            for i, v in enumerate(x):
                walk(v, prefix + (i,))
        else:
            leaves.add(prefix)
    walk(obj, ())
    return leaves


def cmd_same(out, ckpt):
    a, b = load_all(out), load_all(ckpt)
    bad = 0
    if set(a) != set(b):  # the writer orders .metadata its own way: compare as sets
        print(f"KEYS differ: only in output {sorted(set(a) - set(b))}, "
              f"only in checkpoint {sorted(set(b) - set(a))}")
        bad += 1
    n_bytes = 0
    for k in b:
        if k not in a:
            continue
        x, y = a[k], b[k]
        if isinstance(y, torch.Tensor):
            same = isinstance(x, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape \
                and raw(x) == raw(y)
        else:
            n_bytes += 1
            same = type(x) is type(y) and repr(x) == repr(y)
        if not same:
            print(f"DIFFER  {k}: {x!r:.80} vs {y!r:.80}")
            bad += 1
    # planner_data: torch's own converter must rebuild the same nested state dict from both.
    nested = [nested_keys(p) for p in (out, ckpt)]
    if nested[0] != nested[1]:
        print(f"NESTING differs (dcp_to_torch_save): {sorted(nested[0] ^ nested[1])[:5]}")
        bad += 1
    print(f"{'OK' if not bad else 'FAIL'}: {len(b)} entries ({n_bytes} bytes objects), "
          f"{len(nested[1])} nested paths, {bad} problems")
    return 1 if bad else 0


def item_bytes(path, md):
    out = {}
    for idx, si in md.storage_data.items():
        if idx.offset is None:
            with open(os.path.join(path, si.relative_path), "rb") as f:
                f.seek(si.offset)
                out[idx.fqn] = f.read(si.length)
    return out


def cmd_raw_same(out, ckpt):
    mds = [FileSystemReader(p).read_metadata() for p in (out, ckpt)]
    bad = 0
    if set(mds[0].state_dict_metadata) != set(mds[1].state_dict_metadata):
        print("KEYS differ")
        bad += 1
    sds = []
    for p, md in zip((out, ckpt), mds):
        sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
              for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
        dcp.load(sd, checkpoint_id=p, no_dist=True)
        sds.append(sd)
    for k, t in sds[1].items():
        if k not in sds[0] or raw(sds[0][k]) != raw(t):
            print(f"DIFFER  {k}")
            bad += 1
    items = [item_bytes(p, md) for p, md in zip((out, ckpt), mds)]
    for k, b in items[1].items():
        if items[0].get(k) != b:
            print(f"DIFFER  bytes item {k}")
            bad += 1
    print(f"{'OK' if not bad else 'FAIL'}: {len(sds[1])} tensors, {len(items[1])} raw bytes items, "
          f"{bad} problems")
    return 1 if bad else 0


def main(argv):
    ranks = 0
    if "--ranks" in argv:
        i = argv.index("--ranks")
        ranks = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    cmd, args = argv[0], argv[1:]
    if cmd == "load":
        if not args or len(args) % 2:
            raise SystemExit(__doc__)
        return cmd_load(args, ranks)
    if cmd == "items":
        return cmd_items(*args)
    if cmd == "same":
        return cmd_same(*args)
    if cmd == "raw-same":
        return cmd_raw_same(*args)
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
