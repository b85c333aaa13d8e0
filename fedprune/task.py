"""The client's training core, shared by the ClientApp and the NumPyClient adapter.

Nothing here touches Flower records: inputs and outputs are plain dicts of float32 numpy arrays,
torch masks and the validated :class:`~fedprune.config.RunConfig`. The wire layer
(:mod:`clients.client_app`) decodes payloads into these and encodes the results.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedprune.channels import ChannelPruning, channel_graph, channel_scores
from fedprune.config import RunConfig
from fedprune.data import DATASET_SHAPES, ClientDataset, client_data, load_dataset, partition
from fedprune.distill import DistillPair, mutual_distillation_loss
from fedprune.eager import eager_optimizers, eager_step
from fedprune.models import build_model, get_weights, set_weights
from fedprune.node_data import NodeData, load_node_file
from fedprune.pruning import apply_mask, compute_mask, magnitude_scores, sensitivity_scores

if TYPE_CHECKING:  # Opacus (~120 MB resident) is imported only by rounds that train under DP
    from fedprune.privacy import PrivateTrainer

# Opacus's per-sample hooks make torch warn on every DP step; the hooks are what we want.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

TorchMasks = dict[str, torch.Tensor]
AccountantState = dict[str, np.ndarray]


def derive_seed(*parts: int | str) -> int:
    """Return a 63-bit seed derived from ``parts`` (run seed, node, round, purpose)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def new_model(cfg: RunConfig) -> nn.Module:
    """Build the run's model with the run's seed (identical on the server and every client)."""
    input_shape, num_classes = DATASET_SHAPES[cfg.dataset]
    return build_model(
        cfg.model,
        input_shape=input_shape,
        num_classes=num_classes,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def channel_pruning(cfg: RunConfig, model: nn.Module) -> ChannelPruning | None:
    """Return the run's channel pruning for ``model`` (``None`` unless granularity is channel)."""
    if cfg.prune_granularity != "channel":
        return None
    input_shape, _ = DATASET_SHAPES[cfg.dataset]
    return ChannelPruning(channel_graph(model, input_shape), cfg.channel_norm)


def new_teacher(
    cfg: RunConfig, partition_id: int, saved: Mapping[str, np.ndarray] | None = None
) -> nn.Module:
    """Return this node's private distillation teacher (``cfg.teacher_model``).

    Parameters
    ----------
    cfg : RunConfig
        The run (``teacher-model``, ``seed``, ``dataset``).
    partition_id : int
        The node's partition: each node's teacher has its own deterministic initialisation.
    saved : Mapping[str, np.ndarray], optional
        The teacher's weights kept from this node's earlier rounds (``context.state``).
    """
    input_shape, num_classes = DATASET_SHAPES[cfg.dataset]
    teacher = build_model(
        cfg.teacher_model,
        input_shape=input_shape,
        num_classes=num_classes,
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, partition_id, "teacher")),
    )
    if saved is not None:
        set_weights(teacher, saved)
    return teacher


def node_file(cfg: RunConfig, data_path: str) -> NodeData:
    """Load this node's data file, refusing one made for other data settings than the run's."""
    node = load_node_file(data_path)
    node.info.check_run(
        dataset=cfg.dataset,
        partitioning=cfg.partitioning,
        alpha=cfg.alpha,
        classes_per_client=cfg.classes_per_client,
        seed=cfg.seed,
        source=f"node data file {data_path!r}",
    )
    return node


def local_train_data(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    root: str | None = None,
    data_path: str | None = None,
) -> ClientDataset:
    """Return the client's partition of the training split.

    From the node's data file when ``data_path`` is given (``uint8``, the same rows), else
    partitioned in memory (simulation).
    """
    if data_path is not None:
        return node_file(cfg, data_path).train
    return client_data(
        cfg.dataset,
        partition_id,
        num_partitions,
        scheme=cfg.partitioning,
        alpha=cfg.alpha,
        classes_per_client=cfg.classes_per_client,
        seed=cfg.seed,
        root=root,
    )


def local_eval_data(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    root: str | None = None,
    data_path: str | None = None,
) -> ClientDataset:
    """Return the client's IID shard of the held-out test split (federated evaluation)."""
    if data_path is not None:
        return node_file(cfg, data_path).test
    _, test = load_dataset(cfg.dataset, root=root)
    shards = partition(test.y, num_partitions, scheme="iid", seed=cfg.seed)
    return test.subset(shards[partition_id])


def to_torch_masks(masks: Mapping[str, np.ndarray] | None) -> TorchMasks | None:
    """Convert numpy bool masks to torch bool tensors (no copy of the data)."""
    if masks is None:
        return None
    return {name: torch.from_numpy(np.asarray(m, dtype=bool)) for name, m in masks.items()}


@dataclass
class TrainResult:
    """What one round of local training produced."""

    weights: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    epsilon: float | None
    accountant_state: AccountantState | None
    teacher_weights: dict[str, np.ndarray] | None = None
    """The private teacher after this round (``distill`` only); kept on the node, never sent."""


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Return the local optimizer named by the config, over ``params``.

    Built without importing ``torch._dynamo`` (:func:`fedprune.eager.eager_optimizers`).
    """
    eager_optimizers()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


def train(
    cfg: RunConfig,
    model: nn.Module,
    data: ClientDataset,
    *,
    masks: TorchMasks | None,
    server_round: int,
    node_seed: int,
    proximal_mu: float = 0.0,
    accountant_state: AccountantState | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.local_epochs`` epochs (at most ``cfg.local_steps`` steps, if > 0).

    Pruned weights stay at 0.

    Parameters
    ----------
    cfg : RunConfig
        Local-training settings (optimizer, lr, epochs, batch size, DP, distillation).
    model : nn.Module
        The model, already holding the decoded global weights.
    data : ClientDataset
        The client's training partition.
    masks : dict[str, torch.Tensor] or None
        Global mask; pruned weights are zero before training and after every step.
    server_round : int
        The round, for deterministic shuffling and noise.
    node_seed : int
        A seed unique to this client.
    proximal_mu : float
        FedProx proximal term weight (0 disables it).
    accountant_state : AccountantState, optional
        The privacy accountant's state from earlier rounds (DP only).
    teacher : nn.Module, optional
        The node's private teacher (:func:`new_teacher`); required when ``cfg.distill``. It is
        trained with ``model`` by mutual distillation (:mod:`fedprune.distill`): one optimizer
        over both, and under DP one DP-SGD mechanism whose per-sample gradients span both
        parameter sets (jointly clipped to ``max-grad-norm``). Masks apply to ``model`` only.

    Returns
    -------
    TrainResult
        Trained weights, example count, mean training loss (the student's, soft term included,
        when distilling), cumulative ε (DP only) and the trained teacher (distillation only).
    """
    if cfg.distill != (teacher is not None):
        raise ValueError("pass a teacher exactly when cfg.distill is on")
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, node_seed, server_round))
    if masks is not None:
        apply_mask(model, masks)
    loader = data.to_loader(cfg.batch_size, shuffle=True, generator=generator)
    # What the optimizer trains: the model, or the student-teacher pair (masks: student only).
    trained: nn.Module = model if teacher is None else DistillPair(model, teacher)
    trained_masks = masks
    if teacher is not None and masks is not None:
        trained_masks = {f"student.{name}": m for name, m in masks.items()}
    private: PrivateTrainer | None = None
    if cfg.dp:
        from fedprune.privacy import DPConfig, make_private, planned_total_steps

        private = make_private(
            trained,
            lambda params: make_optimizer(cfg, params),
            loader,
            DPConfig.from_run_config(cfg),
            generator=generator,
            masks=trained_masks,
            accountant_state=accountant_state,
            total_steps=planned_total_steps(
                loader,
                num_rounds=cfg.num_server_rounds,
                local_epochs=cfg.local_epochs,
                local_steps=cfg.local_steps,
            ),
        )
        net, optimizer, loader = private.model, private.optimizer, private.loader
    else:
        net = trained
        optimizer = make_optimizer(cfg, list(trained.parameters()))
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    total_loss, total_seen = 0.0, 0
    steps = 0  # local-steps caps the steps of a round, over all its epochs
    for _ in range(cfg.local_epochs):
        for x, y in loader:
            if cfg.local_steps and steps >= cfg.local_steps:
                break
            steps += 1
            # Under DP an empty Poisson batch still takes a (noise-only) step: skipping it would
            # change what a neighbouring dataset's run looks like.
            optimizer.zero_grad(set_to_none=True)
            if teacher is None:
                loss = reported = loss_fn(net(x), y)
            else:
                student_logits, teacher_logits = net(x)
                student_loss, teacher_loss = mutual_distillation_loss(
                    student_logits,
                    teacher_logits,
                    y,
                    temperature=cfg.distill_temperature,
                    alpha=cfg.distill_alpha,
                    beta=cfg.distill_beta,
                )
                # Each loss reads the other model's logits detached: the sum trains each
                # model on its own loss, in one backward pass (one DP-SGD mechanism).
                loss, reported = student_loss + teacher_loss, student_loss
            if anchor:
                prox = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            if private is not None:
                private.step()
            else:
                eager_step(optimizer)
                if masks is not None:
                    apply_mask(model, masks)
            if len(y):
                total_loss += float(reported.detach()) * len(y)
                total_seen += len(y)
    epsilon: float | None = None
    state: AccountantState | None = None
    if private is not None:
        epsilon, state = private.epsilon(), private.accountant_state()
        trained = private.close()  # the DP-compatible module that was trained
    if isinstance(trained, DistillPair):
        model, teacher = trained.student, trained.teacher
    else:
        model = trained
    return TrainResult(
        weights=get_weights(model),
        num_examples=len(data),
        train_loss=total_loss / max(total_seen, 1),
        epsilon=epsilon,
        accountant_state=state,
        teacher_weights=None if teacher is None else get_weights(teacher),
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: ClientDataset, batch_size: int = 512) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy in [0, 1]) of ``model`` on ``data``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for x, y in data.to_loader(batch_size):
        logits = model(x)
        total_loss += float(loss_fn(logits, y))
        correct += int((logits.argmax(dim=1) == y).sum())
    n = max(len(data), 1)
    return total_loss / n, correct / n


def vote(
    cfg: RunConfig,
    model: nn.Module,
    data: ClientDataset,
    *,
    kind: str,
    density: float,
    masks: TorchMasks | None,
    node_seed: int,
    server_round: int,
) -> dict[str, np.ndarray]:
    """Return the mask vote at ``density``: scores ("scores") or a top-k mask ("mask").

    Scores are |w| (magnitude) or sum |w * dL/dw| over a few batches (sensitivity), computed on
    the locally trained model; the mask keeps the top ``density`` fraction within ``masks``.
    """
    names = list(masks) if masks is not None else None
    params = dict(model.named_parameters())
    if names is None:
        raise ValueError("a mask vote needs the global mask the round was trained under")
    if cfg.prune_method == "sensitivity":
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, node_seed, server_round, 1))
        loader = data.to_loader(cfg.batch_size, shuffle=True, generator=generator)
        batches = [batch for _, batch in zip(range(4), loader, strict=False)]
        scores = sensitivity_scores(model, nn.CrossEntropyLoss(), batches, names)
    else:
        scores = magnitude_scores({name: params[name].detach() for name in names})
    if kind == "scores":
        assert masks is not None
        return {name: torch.where(masks[name], scores[name], 0.0).float().numpy() for name in names}
    mask = compute_mask(scores, density, scope="global", prior=masks)
    return {name: m.numpy() for name, m in mask.items()}


def channel_vote(
    cfg: RunConfig,
    plan: ChannelPruning,
    model: nn.Module,
    data: ClientDataset,
    *,
    density: float,
    masks: TorchMasks | None,
    node_seed: int,
    server_round: int,
) -> dict[str, np.ndarray]:
    """Return the wire form of this client's channel vote at parameter ``density``.

    Channels are scored by the ``channel-norm`` of their weights in the locally trained model
    (magnitude; under DP these are DP-trained weights, so the vote is post-processing) or by the
    summed ``|w * dL/dw|`` of their rows over a few batches (sensitivity). Rule ``"topk"`` sends
    the scores, the mask rules this client's channel mask (one bit per channel).
    """
    if cfg.prune_method == "sensitivity":
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, node_seed, server_round, 1))
        loader = data.to_loader(cfg.batch_size, shuffle=True, generator=generator)
        batches = [batch for _, batch in zip(range(4), loader, strict=False)]
        names = sorted({n for g in plan.graph.groups for n in g.scored})
        element = sensitivity_scores(model, nn.CrossEntropyLoss(), batches, names)
        scores = channel_scores({n: t.numpy() for n, t in element.items()}, plan.graph, "l1")
    else:
        scores = plan.scores(get_weights(model))
    prior = None if masks is None else {n: m.numpy() for n, m in masks.items()}
    ballot = plan.own_vote(scores, rule=cfg.reconcile_rule, density=density, prior=prior)
    return plan.encode_vote(ballot, cfg.reconcile_rule)
