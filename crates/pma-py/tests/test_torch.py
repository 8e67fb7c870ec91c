"""A tiny PyTorch training run, checkpointed with safetensors and merged through the API."""

from __future__ import annotations

import json
import os

import pytest

import pma


def require_torch():
    try:
        import torch
    except ImportError:
        if os.environ.get("PMA_REQUIRE_TORCH") == "1":
            pytest.fail("PMA_REQUIRE_TORCH=1 but torch cannot be imported")
        pytest.skip("SKIPPED: torch is not installed (PMA_REQUIRE_TORCH=1 makes this fail)")
    return torch


def test_train_two_steps_save_and_merge(tmp_path):
    torch = require_torch()
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = tmp_path / "run"
    saved = []
    for step in (1, 2):
        x, y = torch.randn(32, 8), torch.randn(32, 4)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt = run / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
        (ckpt / "config.json").write_text(json.dumps({"model_type": "toy"}))
        saved.append(state)

    alpha = 0.3
    out = tmp_path / "merged"
    report = pma.merge(run=run, method="ema", alpha=alpha, last=2, out=out)
    assert report.steps == [1, 2]
    w = pma.weights("ema", 2, alpha=alpha)
    assert w == [1 - alpha, alpha]

    merged = load_file(str(out / "model.safetensors"))
    assert sorted(merged) == sorted(saved[0])
    for name, value in merged.items():
        assert value.dtype == torch.float32
        # The contract: f64 accumulation oldest to newest, rounded once to the output dtype.
        want = (saved[0][name].double() * w[0] + saved[1][name].double() * w[1]).float()
        assert torch.equal(value, want), name
    # The merged weights load back into the model and run.
    model.load_state_dict(merged)
    assert model(torch.randn(2, 8)).shape == (2, 4)
