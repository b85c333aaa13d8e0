"""Tests for fedprune.masks: server-side reconciliation of mask votes."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune.masks import ReconcileConfig, mask_density, reconcile


def b(*values: int) -> np.ndarray:
    return np.array(values, dtype=bool)


def f(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def assert_masks_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == np.bool_, name
        assert got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# Three clients, weights 1, 2, 3 (total 6). Kept weight per entry of "a":
#   e0: 1+2=3  e1: 1  e2: 2+3=5  e3: 3  e4: 1+3=4  e5: 2
BOOL_VOTES = [
    {"a": b(1, 1, 0, 0, 1, 0).reshape(2, 3), "b": b(1, 1, 0)},
    {"a": b(1, 0, 1, 0, 0, 1).reshape(2, 3), "b": b(1, 0, 0)},
    {"a": b(0, 0, 1, 1, 1, 0).reshape(2, 3), "b": b(1, 1, 0)},
]
BOOL_WEIGHTS = [1, 2, 3]


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "vote"}, "rule"),
        ({"rule": "majority", "threshold": 0.0}, "threshold"),
        ({"rule": "majority", "threshold": 1.5}, "threshold"),
        ({"rule": "majority", "threshold": math.nan}, "threshold"),
        ({"rule": "topk", "density": 0.0}, "density"),
        ({"rule": "topk", "density": 1.01}, "density"),
    ],
)
def test_config_rejects_bad_fields(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReconcileConfig(**kwargs)


def test_topk_needs_a_density_at_reconcile_time() -> None:
    config = ReconcileConfig("topk")  # a run-level config; the density comes per round
    with pytest.raises(ValueError, match="density is required"):
        reconcile([{"a": f(1.0, 2.0)}], [1], config)
    assert ReconcileConfig() == ReconcileConfig("topk", 0.5, None)


# -- majority --------------------------------------------------------------------------------


def test_majority_hand_computed_weighted() -> None:
    got = reconcile(BOOL_VOTES, BOOL_WEIGHTS, ReconcileConfig("majority", threshold=0.5))
    # bar = 0.5 * 6 = 3: e0 (3), e2 (5), e3 (3, the heavy client alone), e4 (4).
    assert_masks_equal(got, {"a": b(1, 0, 1, 1, 1, 0).reshape(2, 3), "b": b(1, 1, 0)})


def test_majority_threshold_is_inclusive_and_respected() -> None:
    got = reconcile(BOOL_VOTES, BOOL_WEIGHTS, ReconcileConfig("majority", threshold=0.75))
    # bar = 4.5: only e2 (5); in "b" entry 0 (6) and entry 1 (1+3=4 < 4.5 -> dropped).
    assert_masks_equal(got, {"a": b(0, 0, 1, 0, 0, 0).reshape(2, 3), "b": b(1, 0, 0)})
    two = [{"x": b(1, 0)}, {"x": b(0, 1)}]
    # Equal weights, one of two keeps each entry: share 0.5 >= 0.5 keeps both.
    assert_masks_equal(reconcile(two, [4, 4], ReconcileConfig("majority")), {"x": b(1, 1)})


def test_majority_weights_decide_against_head_count() -> None:
    votes = [{"x": b(1, 1, 0)}, {"x": b(1, 0, 0)}, {"x": b(0, 1, 1)}]
    config = ReconcileConfig("majority", threshold=0.5)
    # Unweighted: 2 of 3 keep e0 and e1, 1 of 3 keeps e2.
    assert_masks_equal(reconcile(votes, [1, 1, 1], config), {"x": b(1, 1, 0)})
    # The third client holds 5 of 7 examples: its vote wins everywhere.
    assert_masks_equal(reconcile(votes, [1, 1, 5], config), {"x": b(0, 1, 1)})
    # Float weights work the same way: 0.3 + 0.3 < 0.5 * 1.6.
    assert_masks_equal(reconcile(votes, [0.3, 0.3, 1.0], config), {"x": b(0, 1, 1)})


# -- intersection / union --------------------------------------------------------------------


def test_intersection_and_union_hand_computed() -> None:
    inter = reconcile(BOOL_VOTES, BOOL_WEIGHTS, ReconcileConfig("intersection"))
    assert_masks_equal(inter, {"a": np.zeros((2, 3), dtype=bool), "b": b(1, 0, 0)})
    union = reconcile(BOOL_VOTES, BOOL_WEIGHTS, ReconcileConfig("union"))
    assert_masks_equal(union, {"a": np.ones((2, 3), dtype=bool), "b": b(1, 1, 0)})


@pytest.mark.parametrize(
    ("rule", "want_a", "want_b"),
    [
        ("majority", (1, 0, 1, 0, 1, 0), (1, 0, 0)),
        ("intersection", (0, 0, 0, 0, 0, 0), (1, 0, 0)),
        ("union", (1, 1, 1, 0, 1, 0), (1, 0, 0)),
    ],
)
def test_mask_rules_never_keep_outside_prior(
    rule: str, want_a: tuple[int, ...], want_b: tuple[int, ...]
) -> None:
    prior = {"b": b(1, 0, 1), "a": b(1, 1, 1, 0, 1, 0).reshape(2, 3)}
    got = reconcile(BOOL_VOTES, BOOL_WEIGHTS, ReconcileConfig(rule), prior=prior)  # type: ignore[arg-type]
    # Output follows the prior's key order.
    assert_masks_equal(got, {"b": b(*want_b), "a": b(*want_a).reshape(2, 3)})


# -- top-k -----------------------------------------------------------------------------------

# Weighted sums (weights 1 and 3): w1 = [4, 12, 8], w2 = [12, 8]; averages [1, 3, 2], [3, 2].
SCORE_VOTES = [
    {"w2": f(0, 8), "w1": f(4, 0, 2)},
    {"w2": f(4, 0), "w1": f(0, 4, 2)},
]
SCORE_WEIGHTS = [1, 3]


@pytest.mark.parametrize(
    ("density", "want_w1", "want_w2"),
    [
        (0.2, (0, 1, 0), (0, 0)),  # k=1: tie of 3s, sorted names put w1 first
        (0.4, (0, 1, 0), (1, 0)),  # k=2: both 3s
        (0.6, (0, 1, 1), (1, 0)),  # k=3: tie of 2s, w1[2] beats w2[1] (sorted names)
        (0.8, (0, 1, 1), (1, 1)),  # k=4
        (1.0, (1, 1, 1), (1, 1)),
    ],
)
def test_topk_hand_computed_with_tie_breaking(
    density: float, want_w1: tuple[int, ...], want_w2: tuple[int, ...]
) -> None:
    got = reconcile(SCORE_VOTES, SCORE_WEIGHTS, ReconcileConfig("topk", density=density))
    assert_masks_equal(got, {"w2": b(*want_w2), "w1": b(*want_w1)})


def test_topk_weights_change_the_ranking() -> None:
    # Equal weights: averages w1 = [2, 2, 2], w2 = [2, 4]; heavy second client: [1, 3, 2], [3, 2].
    config = ReconcileConfig("topk", density=0.2)
    assert_masks_equal(reconcile(SCORE_VOTES, [1, 1], config), {"w2": b(0, 1), "w1": b(0, 0, 0)})
    assert_masks_equal(reconcile(SCORE_VOTES, [1, 3], config), {"w2": b(0, 0), "w1": b(0, 1, 0)})


def test_topk_draws_from_prior_only() -> None:
    prior = {"w2": b(1, 1), "w1": b(1, 1, 0)}
    got = reconcile(SCORE_VOTES, SCORE_WEIGHTS, ReconcileConfig("topk", density=0.6), prior=prior)
    # k=3 among w1[0] (1), w1[1] (3), w2[0] (3), w2[1] (2).
    assert_masks_equal(got, {"w2": b(1, 1), "w1": b(0, 1, 0)})


def test_topk_prior_sparser_than_target_is_kept_as_is() -> None:
    prior = {"w2": b(0, 1), "w1": b(1, 0, 0)}
    got = reconcile(SCORE_VOTES, SCORE_WEIGHTS, ReconcileConfig("topk", density=0.8), prior=prior)
    assert_masks_equal(got, prior)


def test_topk_order_sensitive_sums_are_canonical() -> None:
    # Naive float64 sums of these scores depend on the order: 1e16 + 1 rounds to 1e16.
    votes = [{"a": f(1e16, 0.75)}, {"a": f(-1e16, 0.0)}, {"a": f(1.0, 0.0)}]
    big = float(np.float32(1e16))
    assert (big + -big) + 1.0 != (big + 1.0) + -big  # the test has teeth
    config = ReconcileConfig("topk", density=0.5)
    results = set()
    for perm in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]:
        got = reconcile([votes[i] for i in perm], [1, 1, 1], config)
        assert int(got["a"].sum()) == 1
        results.add(got["a"].tobytes())
    assert len(results) == 1


def test_majority_order_sensitive_sums_are_canonical() -> None:
    # Entry j of the mask is kept by the clients in the j-th subset of {0, 1, 2, 3}.
    weights = [0.1, 0.2, 0.3, 0.4]
    subsets = np.array(list(itertools.product([False, True], repeat=4)))  # (16, 4)
    votes = [{"x": subsets[:, i].copy()} for i in range(4)]
    threshold = 0.6

    def naive(order: tuple[int, ...]) -> bytes:
        total = 0.0
        for i in order:
            total += weights[i]
        acc = np.zeros(16)
        for i in order:
            acc += np.where(subsets[:, i], weights[i], 0.0)
        return (acc >= threshold * total).tobytes()

    perms = list(itertools.permutations(range(4)))
    assert len({naive(p) for p in perms}) > 1  # the test has teeth
    config = ReconcileConfig("majority", threshold=threshold)
    results = {
        reconcile([votes[i] for i in p], [weights[i] for i in p], config)["x"].tobytes()
        for p in perms
    }
    assert len(results) == 1


def _random_votes(
    rng: np.random.Generator, n: int, shapes: dict[str, tuple[int, ...]], scores: bool
) -> list[dict[str, np.ndarray]]:
    votes = []
    for _ in range(n):
        vote: dict[str, np.ndarray]
        if scores:
            # Huge dynamic range and many repeats: float sums depend on order, ties are common.
            vote = {
                k: (rng.integers(-3, 4, s) * 10.0 ** rng.integers(0, 17, s)).astype(np.float32)
                for k, s in shapes.items()
            }
        else:
            vote = {k: rng.random(s) < 0.5 for k, s in shapes.items()}
        votes.append(vote)
    return votes


SHAPES = {"layer.weight": (4, 5), "conv.weight": (3, 2, 2, 2), "fc.weight": (7,)}


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
    rule=st.sampled_from(["majority", "intersection", "union", "topk"]),
    use_prior=st.booleans(),
)
def test_any_reply_order_gives_identical_masks(
    data: st.DataObject, n: int, seed: int, rule: str, use_prior: bool
) -> None:
    rng = np.random.default_rng(seed)
    votes = _random_votes(rng, n, SHAPES, scores=rule == "topk")
    # Repeated float weights exercise the canonical order's second key.
    weights = rng.choice([0.1, 0.7, 2.5, 1e6], size=n)
    prior = {k: rng.random(s) < 0.8 for k, s in SHAPES.items()} if use_prior else None
    config = ReconcileConfig(rule, threshold=0.4, density=0.35)  # type: ignore[arg-type]
    want = reconcile(votes, weights, config, prior=prior)
    perm = data.draw(st.permutations(range(n)))
    got = reconcile([votes[i] for i in perm], weights[list(perm)], config, prior=prior)
    assert_masks_equal(got, want)
    if prior is not None:
        for k in SHAPES:
            assert not np.any(got[k] & ~prior[k])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0.01, 1.0),
    use_prior=st.booleans(),
)
def test_topk_keeps_exact_count(seed: int, density: float, use_prior: bool) -> None:
    rng = np.random.default_rng(seed)
    votes = _random_votes(rng, 3, SHAPES, scores=True)
    prior = {k: rng.random(s) < 0.5 for k, s in SHAPES.items()} if use_prior else None
    got = reconcile(votes, [3, 1, 2], ReconcileConfig("topk", density=density), prior=prior)
    total = sum(math.prod(s) for s in SHAPES.values())
    k = round(density * total)
    if prior is not None:
        k = min(k, sum(int(p.sum()) for p in prior.values()))
        assert not any(np.any(got[n] & ~prior[n]) for n in SHAPES)
    assert sum(int(m.sum()) for m in got.values()) == k
    if prior is None:
        assert mask_density(got) == pytest.approx(k / total)


def test_majority_with_integer_weights_is_exact() -> None:
    # 10 clients with weights 1..10 (total 55); an entry kept by clients 1..10 except 3 and 4
    # has exactly 48 of 55; threshold 48/55 keeps it, a hair above drops it.
    votes = [{"x": b(1, int(i not in (3, 4)))} for i in range(1, 11)]
    weights = list(range(1, 11))
    kept = reconcile(votes, weights, ReconcileConfig("majority", threshold=48 / 55))
    assert_masks_equal(kept, {"x": b(1, 1)})
    dropped = reconcile(votes, weights, ReconcileConfig("majority", threshold=48 / 55 + 1e-9))
    assert_masks_equal(dropped, {"x": b(1, 0)})


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("votes", "weights", "match"),
    [
        ([], [], "votes must not be empty"),
        ([{}], [1], r"votes\[0\] must not be empty"),
        ([{"a": b(1)}, {"b": b(1)}], [1, 1], "names"),
        ([{"a": b(1, 0)}, {"a": b(1)}], [1, 1], "shape"),
        ([{"a": b(1)}, {"a": b(1)}], [1], "one entry per vote"),
        ([{"a": b(1)}, {"a": b(1)}], [[1, 1]], "one entry per vote"),
        ([{"a": b(1)}, {"a": b(1)}], [1, 0], "positive"),
        ([{"a": b(1)}, {"a": b(1)}], [1, -2], "positive"),
        ([{"a": b(1)}, {"a": b(1)}], [1, math.inf], "finite"),
        ([{"a": b(1)}, {"a": b(1)}], [1, math.nan], "finite"),
        ([{"a": f(1.0)}, {"a": f(1.0)}], [1, 1], "bool mask"),
        ([{"a": b(1)}, {"a": [True]}], [1, 1], "numpy array"),
    ],
)
def test_reconcile_rejects_bad_votes_and_weights(
    votes: list[dict[str, Any]], weights: list[Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        reconcile(votes, weights, ReconcileConfig("majority"))


@pytest.mark.parametrize(
    ("vote", "match"),
    [
        ({"a": b(1, 0)}, "floating-point scores"),
        ({"a": np.array([1, 2], dtype=np.int64)}, "floating-point scores"),
        ({"a": f(1.0, math.nan)}, "non-finite"),
        ({"a": f(math.inf, 1.0)}, "non-finite"),
    ],
)
def test_topk_rejects_non_scores(vote: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reconcile([{"a": f(1.0, 2.0)}, vote], [1, 1], ReconcileConfig("topk", density=0.5))


@pytest.mark.parametrize(
    ("prior", "match"),
    [
        ({"b": b(1, 1)}, "prior has names"),
        ({"a": b(1, 1, 1)}, "shape"),
        ({"a": np.ones(2, dtype=np.float32)}, "bool"),
    ],
)
def test_reconcile_rejects_bad_prior(prior: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reconcile([{"a": b(1, 0)}], [1], ReconcileConfig("union"), prior=prior)


# -- mask_density ----------------------------------------------------------------------------


def test_mask_density_hand_computed() -> None:
    masks = {"a": b(1, 0, 1), "b": b(1, 0, 0, 0).reshape(2, 2)}
    assert mask_density(masks) == 3 / 7
    assert mask_density({"a": np.ones((3, 3), dtype=bool)}) == 1.0


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        ({}, "empty"),
        ({"a": np.zeros(0, dtype=bool)}, "no entries"),
        ({"a": np.ones(3, dtype=np.float32)}, "bool"),
    ],
)
def test_mask_density_rejects_bad_input(masks: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mask_density(masks)


def test_strided_and_empty_votes_are_handled() -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    strided = {"a": base[:, ::2], "e": np.zeros((0, 3), dtype=np.float32)}
    dense = {"a": np.ascontiguousarray(base[:, ::2]), "e": np.zeros((0, 3), dtype=np.float32)}
    config = ReconcileConfig("topk", density=0.5)
    got = reconcile([strided, dense], [1, 2], config)
    # Scores [[0, 2], [4, 6], [8, 10]]: k = round(0.5 * 6) = 3 -> 10, 8, 6.
    assert_masks_equal(got, {"a": b(0, 0, 0, 1, 1, 1).reshape(3, 2), "e": np.zeros((0, 3), bool)})
    assert_masks_equal(got, reconcile([dense, strided], [2, 1], config))
