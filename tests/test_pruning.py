"""Tests for fedprune.pruning: scores, masks and schedule (channels: tests/test_channels.py)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from fedprune.pruning import (
    apply_mask,
    compute_mask,
    magnitude_scores,
    polynomial_density,
    prunable_names,
    sensitivity_scores,
)

torch.set_num_threads(1)


def bt(*values: int) -> Tensor:
    return torch.tensor(values, dtype=torch.bool)


def sub(model: nn.Module, path: str) -> Any:
    """A submodule, untyped: tests read layer attributes freely."""
    return model.get_submodule(path)


def assert_masks_equal(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == torch.bool, name
        assert torch.equal(got[name], want[name]), (name, got[name], want[name])


# -- prunable_names / magnitude ---------------------------------------------------------------


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.c1 = nn.Conv1d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3, bias=False)
        self.c3 = nn.Conv3d(1, 2, 2)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never run
        return x


def test_prunable_names_in_state_dict_order() -> None:
    assert prunable_names(Zoo()) == [
        "c1.weight",
        "c2.weight",
        "c3.weight",
        "head.0.weight",
        "head.2.weight",
    ]
    assert prunable_names(nn.Linear(3, 2)) == ["weight"]


def test_magnitude_scores_are_abs_for_model_and_mapping() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    scores = magnitude_scores(model)
    assert list(scores) == ["0.weight", "2.weight"]
    assert torch.equal(scores["0.weight"], sub(model, "0").weight.detach().abs())
    assert not scores["0.weight"].requires_grad
    t = torch.tensor([[-1.5, 0.0], [2.0, -0.25]])
    assert torch.equal(magnitude_scores({"w": t})["w"], torch.tensor([[1.5, 0.0], [2.0, 0.25]]))


# -- sensitivity -----------------------------------------------------------------------------


def test_sensitivity_scalar_hand_computed() -> None:
    # w = 2, loss (w x - t)^2. Batch 1: x=3, t=1 -> dL/dw = 2*5*3 = 30, |w g| = 60.
    # Batch 2: x=1, t=0 -> dL/dw = 2*2*1 = 4, |w g| = 8. Sum 68.
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    batches = [
        (torch.tensor([[3.0]]), torch.tensor([[1.0]])),
        (torch.tensor([[1.0]]), torch.tensor([[0.0]])),
    ]
    scores = sensitivity_scores(model, nn.MSELoss(), batches, ["weight"])
    assert torch.equal(scores["weight"], torch.tensor([[68.0]]))


def test_sensitivity_matches_closed_form_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 3, generator=gen))
        model.bias.copy_(torch.randn(2, generator=gen))
    batches = [(torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)) for _ in "ab"]
    w = model.weight.detach().double().numpy()
    bias = model.bias.detach().double().numpy()
    want = np.zeros((2, 3))
    for x, t in batches:
        xn, tn = x.double().numpy(), t.double().numpy()
        resid = xn @ w.T + bias - tn  # (B, 2)
        grad = 2.0 / resid.size * resid.T @ xn  # d mean((xW^T + b - t)^2) / dW
        want += np.abs(w * grad)
    got = sensitivity_scores(model, nn.MSELoss(), batches)  # names default: prunable
    assert list(got) == ["weight"]
    np.testing.assert_allclose(got["weight"].numpy(), want, rtol=1e-5, atol=1e-6)


def test_sensitivity_leaves_grads_modes_and_stats_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))
    model.train()
    sub(model, "1").eval()  # mixed modes are restored per module
    sentinel = torch.full_like(sub(model, "0").weight, 7.0)
    sub(model, "0").weight.grad = sentinel.clone()
    stats = sub(model, "1").running_mean.clone()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen))]
    with torch.no_grad():  # scoring works even inside no_grad
        scores = sensitivity_scores(model, nn.CrossEntropyLoss(), batches)
    assert set(scores) == {"0.weight", "3.weight"}
    assert torch.equal(sub(model, "0").weight.grad, sentinel)
    assert sub(model, "3").weight.grad is None
    assert sub(model, "0").bias.grad is None
    assert torch.equal(sub(model, "1").running_mean, stats)
    assert [m.training for m in model] == [True, False, True, True]
    # Eval mode: deterministic (dropout off), so a second call gives the same scores.
    again = sensitivity_scores(model, nn.CrossEntropyLoss(), batches)
    assert torch.equal(again["0.weight"], scores["0.weight"])


def test_sensitivity_rejects_bad_input() -> None:
    model = nn.Linear(2, 1)
    batch = [(torch.zeros(1, 2), torch.zeros(1, 1))]
    with pytest.raises(ValueError, match="not a parameter"):
        sensitivity_scores(model, nn.MSELoss(), batch, ["nope"])
    with pytest.raises(ValueError, match="names must not be empty"):
        sensitivity_scores(model, nn.MSELoss(), batch, [])
    with pytest.raises(ValueError, match="batches must not be empty"):
        sensitivity_scores(model, nn.MSELoss(), [])
    model.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        sensitivity_scores(model, nn.MSELoss(), batch)


# -- compute_mask ----------------------------------------------------------------------------


def hand_scores() -> dict[str, Tensor]:
    return {
        "b": torch.tensor([[0.5, 3.0], [1.0, 2.0]]),
        "a": torch.tensor([2.0, 0.1, 3.0]),
    }


def test_compute_mask_global_hand_computed() -> None:
    # k = round(3/7 * 7) = 3: the two 3.0s, then the 2.0 tie goes to "a" (sorted names first).
    got = compute_mask(hand_scores(), 3 / 7)
    assert_masks_equal(got, {"b": torch.tensor([[0, 1], [0, 0]]).bool(), "a": bt(1, 0, 1)})


def test_compute_mask_layer_hand_computed() -> None:
    # "b": round(0.5 * 4) = 2 -> 3.0, 2.0; "a": round(0.5 * 3) = round(1.5) = 2 -> 3.0, 2.0.
    got = compute_mask(hand_scores(), 0.5, scope="layer")
    assert_masks_equal(got, {"b": torch.tensor([[0, 1], [0, 1]]).bool(), "a": bt(1, 0, 1)})


def test_compute_mask_ties_go_to_lower_position() -> None:
    scores = {"z": torch.ones(2, 2), "y": torch.ones(4)}
    got = compute_mask(scores, 0.5)
    assert_masks_equal(got, {"z": torch.zeros(2, 2, dtype=torch.bool), "y": bt(1, 1, 1, 1)})
    got = compute_mask(scores, 0.75, scope="layer")  # round(3) per layer
    assert_masks_equal(got, {"z": torch.tensor([[1, 1], [1, 0]]).bool(), "y": bt(1, 1, 1, 0)})


def test_compute_mask_respects_prior_from_numpy_or_torch() -> None:
    prior_np = {"b": np.array([[True, False], [True, True]]), "a": np.array([True, True, False])}
    # Allowed: b 0.5, 1.0, 2.0; a 2.0, 0.1. k=3 -> b[1,1] (2.0), a[0] (2.0), b[1,0] (1.0).
    want = {"b": torch.tensor([[0, 0], [1, 1]]).bool(), "a": bt(1, 0, 0)}
    assert_masks_equal(compute_mask(hand_scores(), 3 / 7, prior=prior_np), want)
    prior_t = {k: torch.from_numpy(v) for k, v in prior_np.items()}
    assert_masks_equal(compute_mask(hand_scores(), 3 / 7, prior=prior_t), want)
    # Target above the prior's count: the prior is kept as is.
    assert_masks_equal(compute_mask(hand_scores(), 1.0, prior=prior_t), prior_t)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0.01, 1.0),
    scope=st.sampled_from(["global", "layer"]),
    use_prior=st.booleans(),
    n_layers=st.integers(1, 4),
)
def test_compute_mask_exact_counts(
    seed: int, density: float, scope: str, use_prior: bool, n_layers: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        tuple(int(d) for d in torch.randint(1, 6, (2,), generator=gen)) for _ in range(n_layers)
    ]
    # Small integer scores: many ties.
    scores = {
        f"l{i}.weight": torch.randint(0, 4, s, generator=gen).float() for i, s in enumerate(shapes)
    }
    prior = (
        {k: torch.rand(v.shape, generator=gen) < 0.6 for k, v in scores.items()}
        if use_prior
        else None
    )
    got = compute_mask(scores, density, scope=scope, prior=prior)  # type: ignore[arg-type]
    assert list(got) == list(scores)
    for k, m in got.items():
        assert m.shape == scores[k].shape and m.dtype == torch.bool
        if prior is not None:
            assert not bool((m & ~prior[k]).any())

    def allowed(k: str) -> int:
        return scores[k].numel() if prior is None else int(prior[k].sum())

    if scope == "global":
        total = sum(v.numel() for v in scores.values())
        want = min(round(density * total), sum(allowed(k) for k in scores))
        assert sum(int(m.sum()) for m in got.values()) == want
    else:
        for k, m in got.items():
            assert int(m.sum()) == min(round(density * scores[k].numel()), allowed(k))
    # Every kept score is >= every dropped (allowed) score: it is a top-k.
    kept = torch.cat([scores[k][got[k]] for k in scores])
    mask_ok = {k: (prior[k] if prior is not None else torch.ones_like(got[k])) for k in scores}
    dropped = torch.cat([scores[k][mask_ok[k] & ~got[k]] for k in scores])
    if scope == "global" and kept.numel() and dropped.numel():
        assert float(kept.min()) >= float(dropped.max())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": {}, "density": 0.5}, "scores must not be empty"),
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"density": math.nan}, "density"),
        ({"density": 0.5, "scope": "tensor"}, "scope"),
        ({"density": 0.5, "prior": {"a": bt(1, 1, 1)}}, "prior has names"),
        ({"density": 0.5, "prior": {"a": bt(1, 1), "b": torch.ones(2, 2).bool()}}, "shape"),
        (
            {"density": 0.5, "prior": {"a": torch.ones(3), "b": torch.ones(2, 2).bool()}},
            "bool",
        ),
        ({"scores": {"a": torch.tensor([1.0, math.nan])}, "density": 0.5}, "non-finite"),
        ({"scores": {"a": torch.tensor([1.0, math.inf])}, "density": 0.5}, "non-finite"),
    ],
)
def test_compute_mask_rejects_bad_input(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("scores", hand_scores())
    with pytest.raises(ValueError, match=match):
        compute_mask(**kwargs)


# -- apply_mask ------------------------------------------------------------------------------


def test_apply_mask_writes_exact_positive_zeros() -> None:
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        sub(model, "0").weight.copy_(-torch.rand(4, 5, generator=gen) - 0.1)  # all negative
        sub(model, "0").weight[0, 0] = math.nan
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {"0.weight": torch.rand(4, 5, generator=gen) < 0.5}
    masks["0.weight"][0, 0] = False
    masks_np = {"2.weight": (torch.rand(2, 4, generator=gen) < 0.5).numpy()}
    apply_mask(model, masks)
    apply_mask(model, masks_np)
    for name, m in [
        ("0.weight", masks["0.weight"]),
        ("2.weight", torch.from_numpy(masks_np["2.weight"])),
    ]:
        w = model.state_dict()[name]
        pruned = w[~m]
        assert torch.equal(pruned, torch.zeros_like(pruned))
        assert not bool(torch.signbit(pruned).any())  # +0.0, not -0.0
        assert torch.equal(w[m], before[name][m])
    assert torch.equal(sub(model, "0").bias, before["0.bias"])


def test_apply_mask_on_mapping_is_in_place() -> None:
    model = nn.Linear(3, 2)
    params = model.state_dict()  # shares storage with the model
    apply_mask(params, {"weight": torch.tensor([[1, 0, 1], [0, 0, 1]]).bool()})
    assert int((model.weight == 0).sum()) == 3
    assert model.weight[0, 1].item() == 0.0 and model.weight[1, 0].item() == 0.0


def test_apply_mask_rejects_bad_input() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="no tensor named"):
        apply_mask(model, {"nope": torch.ones(2, 3).bool()})
    with pytest.raises(ValueError, match="shape"):
        apply_mask(model, {"weight": torch.ones(3, 2).bool()})
    with pytest.raises(ValueError, match="bool"):
        apply_mask(model, {"weight": torch.ones(2, 3)})


# -- polynomial_density ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "want"),
    [
        (0, 1.0),
        (1, 1.0),
        (2, 0.3 + 0.7 * 0.75**3),  # 0.5953125
        (3, 0.3 + 0.7 * 0.5**3),  # 0.3875
        (4, 0.3 + 0.7 * 0.25**3),  # 0.3109375
        (5, 0.3),
        (9, 0.3),
    ],
)
def test_polynomial_density_hand_computed(t: int, want: float) -> None:
    got = polynomial_density(t, initial=1.0, final=0.3, start_round=1, end_round=5)
    assert got == pytest.approx(want, abs=1e-12)


def test_polynomial_density_literal_values_and_power() -> None:
    kw: dict[str, Any] = {"initial": 1.0, "final": 0.3, "start_round": 1, "end_round": 5}
    assert polynomial_density(2, **kw) == pytest.approx(0.5953125)
    assert polynomial_density(3, **kw) == pytest.approx(0.3875)
    assert polynomial_density(3, power=1.0, **kw) == pytest.approx(0.65)
    same: dict[str, Any] = {"initial": 0.8, "final": 0.2, "start_round": 3, "end_round": 3}
    assert polynomial_density(2, **same) == 0.8
    assert polynomial_density(3, **same) == 0.2
    values = [polynomial_density(t, **kw) for t in range(8)]
    assert all(a >= b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"initial": 0.5, "final": 0.6}, "final <= initial"),
        ({"initial": 1.2, "final": 0.6}, "initial <= 1"),
        ({"initial": 0.5, "final": 0.0}, "0 < final"),
        ({"initial": math.nan, "final": 0.2}, "final"),
        ({"start_round": 4, "end_round": 2}, "start_round"),
        ({"power": 0.0}, "power"),
        ({"power": math.inf}, "power"),
    ],
)
def test_polynomial_density_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"initial": 1.0, "final": 0.3, "start_round": 1, "end_round": 5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        polynomial_density(2, **args)
