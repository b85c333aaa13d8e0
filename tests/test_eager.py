"""fedprune.eager: a client's optimizer steps without importing torch._dynamo, same numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Run in a fresh interpreter: the test process may have imported torch._dynamo already (then
# the eager path steps aside and a check here would prove nothing).
_SCRIPT = """
import sys
import numpy as np
import torch
from torch import nn
from fedprune import task
from fedprune.config import RunConfig
from fedprune.data import load_dataset
from fedprune.eager import eager_optimizers, eager_step

def run(name, eager):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    if eager:
        eager_optimizers()
    params = list(model.parameters())
    if name == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(params, lr=0.01)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 3
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        eager_step(opt) if eager else opt.step()
    return [p.detach().clone() for p in model.parameters()]

eager = {name: run(name, True) for name in ("sgd", "adam")}
cfg = RunConfig.from_mapping({"local-steps": 3})
data = load_dataset("digits")[0].subset(np.arange(64))  # no partitioner: runs on a node install
result = task.train(cfg, task.new_model(cfg), data, masks=None, server_round=1, node_seed=0)
assert result.num_examples == len(data)
assert "torch._dynamo" not in sys.modules, "the eager path imported torch._dynamo"
plain = {name: run(name, False) for name in ("sgd", "adam")}
assert "torch._dynamo" in sys.modules, "torch's own step no longer imports it: drop fedprune.eager"
for name in eager:
    for a, b in zip(eager[name], plain[name], strict=True):
        assert torch.equal(a, b), name
print("OK")
"""


@pytest.mark.slow  # a fresh interpreter importing torch, then torch._dynamo: minutes
def test_eager_steps_match_torch_without_importing_dynamo() -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")
