"""Knowledge distillation (issue 8): the loss, DP composition, and the teacher staying home."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from opacus.accountants import RDPAccountant
from torch import nn

from boundary.records import from_record, to_record
from clients import client_app
from clients.client_app import make_client_app
from fedprune import codec, keys, task
from fedprune.config import RunConfig
from fedprune.distill import DistillPair, mutual_distillation_loss
from fedprune.models import get_weights
from fedprune.privacy import DPConfig, make_private, planned_total_steps
from fedprune.results import RunSummary
from simulations.grid import server_task_identity
from simulations.simulate import backend_config
from strategies.server_app import run as server_run

torch.set_num_threads(1)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


# -- the loss, by hand -------------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _reference(s, t, y, temperature, alpha, beta):
    """The losses the docstring states, written out in float64 numpy."""
    n = len(y)
    ce_s = -np.log(_softmax(s)[np.arange(n), y]).mean()
    ce_t = -np.log(_softmax(t)[np.arange(n), y]).mean()
    ps, pt = _softmax(s / temperature), _softmax(t / temperature)
    kl_t_s = (pt * (np.log(pt) - np.log(ps))).sum(axis=1).mean()  # KL(p_T(t) || p_T(s))
    kl_s_t = (ps * (np.log(ps) - np.log(pt))).sum(axis=1).mean()  # KL(p_T(s) || p_T(t))
    return (
        ce_s + alpha * temperature**2 * kl_t_s,
        ce_t + beta * temperature**2 * kl_s_t,
    )


def test_loss_of_a_hand_computed_case() -> None:
    # One example, two classes, T = 2, alpha = 0.5, beta = 0.25: every number by hand.
    # s = [0, ln 3] -> softmax(s) = [1/4, 3/4]; CE(s, y=1) = ln(4/3).
    # t = [0, 2 ln 3] -> softmax(t) = [1/10, 9/10]; CE(t, y=1) = ln(10/9).
    # At T = 2: p_T(s) = softmax([0, ln 3 / 2]) = [1/(1+√3), √3/(1+√3)],
    #           p_T(t) = softmax([0, ln 3])     = [1/4, 3/4].
    r3 = np.sqrt(3.0)
    ps, pt = np.array([1, r3]) / (1 + r3), np.array([0.25, 0.75])
    kl_t_s = float((pt * np.log(pt / ps)).sum())
    kl_s_t = float((ps * np.log(ps / pt)).sum())
    student_expected = np.log(4 / 3) + 0.5 * 4 * kl_t_s
    teacher_expected = np.log(10 / 9) + 0.25 * 4 * kl_s_t
    s = torch.tensor([[0.0, np.log(3.0)]], dtype=torch.float64)
    t = torch.tensor([[0.0, 2 * np.log(3.0)]], dtype=torch.float64)
    student, teacher = mutual_distillation_loss(
        s, t, torch.tensor([1]), temperature=2.0, alpha=0.5, beta=0.25
    )
    assert float(student) == pytest.approx(student_expected, rel=1e-12)
    assert float(teacher) == pytest.approx(teacher_expected, rel=1e-12)
    # The numbers, by hand: p_T(s) = [0.36603, 0.63397];
    # KL(p_T(t) || p_T(s)) = 0.25 ln(0.25 / 0.36603) + 0.75 ln(0.75 / 0.63397) = 0.030738,
    # KL(p_T(s) || p_T(t)) = 0.36603 ln(0.36603 / 0.25) + 0.63397 ln(0.63397 / 0.75) = 0.032996.
    assert float(student) == pytest.approx(0.287682 + 0.5 * 4 * 0.030738, abs=1e-5)
    assert float(teacher) == pytest.approx(0.105361 + 0.25 * 4 * 0.032996, abs=1e-5)


@pytest.mark.parametrize(("temperature", "alpha", "beta"), [(3.0, 1.0, 1.0), (0.5, 0.0, 2.0)])
def test_loss_matches_the_formula_on_a_batch(temperature: float, alpha: float, beta: float) -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 4)) * 3, rng.normal(size=(5, 4)) * 3
    y = rng.integers(0, 4, size=5)
    got = mutual_distillation_loss(
        torch.tensor(s),
        torch.tensor(t),
        torch.tensor(y),
        temperature=temperature,
        alpha=alpha,
        beta=beta,
    )
    expected = _reference(s, t, y, temperature, alpha, beta)
    np.testing.assert_allclose([float(v) for v in got], expected, rtol=1e-10)


def test_each_loss_gives_no_gradient_to_the_other_model() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 3, generator=g, requires_grad=True)
    t = torch.randn(4, 3, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    student, teacher = mutual_distillation_loss(s, t, y, temperature=3.0, alpha=1.0, beta=1.0)
    grad_s, grad_t = torch.autograd.grad(student, (s, t), allow_unused=True)
    assert grad_t is None and grad_s is not None and bool(grad_s.abs().sum() > 0)
    grad_s, grad_t = torch.autograd.grad(teacher, (s, t), allow_unused=True)
    assert grad_s is None and grad_t is not None and bool(grad_t.abs().sum() > 0)


def test_empty_batch_is_a_zero_loss_that_still_backpropagates() -> None:
    pair = DistillPair(nn.Linear(3, 2), nn.Linear(3, 2))
    s, t = pair(torch.zeros(0, 3))
    y = torch.zeros(0, dtype=torch.long)
    student, teacher = mutual_distillation_loss(s, t, y, temperature=2, alpha=1, beta=1)
    (student + teacher).backward()
    assert float(student.detach()) == 0.0 and float(teacher.detach()) == 0.0
    assert all(p.grad is not None and bool((p.grad == 0).all()) for p in pair.parameters())


def test_bad_arguments_are_named() -> None:
    s = torch.zeros(2, 3)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        mutual_distillation_loss(s, s, y, temperature=0.0, alpha=1, beta=1)
    with pytest.raises(ValueError, match="alpha and beta"):
        mutual_distillation_loss(s, s, y, temperature=1.0, alpha=-1, beta=1)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        mutual_distillation_loss(s, torch.zeros(2, 4), y, temperature=1.0, alpha=1, beta=1)


# -- DP: one mechanism over both models --------------------------------------------------------


def _pair(seed: int = 0) -> DistillPair:
    torch.manual_seed(seed)
    return DistillPair(
        nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)),
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)),
    )


def _joint_loss(pair: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s, t = pair(x)
    student, teacher = mutual_distillation_loss(s, t, y, temperature=2.0, alpha=0.7, beta=0.3)
    return student + teacher


def test_dp_clips_the_per_sample_gradient_of_both_models_jointly() -> None:
    c = 0.05  # small: every sample is clipped
    pair, reference = _pair(), _pair()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 6, generator=g) * 3
    y = torch.randint(0, 3, (6,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    keep = {"student.0.weight": torch.rand(4, 6, generator=g) < 0.5}
    trainer = make_private(
        pair,
        lambda params: torch.optim.SGD(params, lr=0.1),
        loader,
        DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=c),
        generator=torch.Generator(),
        masks=keep,
    )
    trainer.optimizer.noise_multiplier = 0.0  # test only: clipping without noise
    reference.load_state_dict(pair.state_dict())  # masked initial weights
    names = [n for n, _ in reference.named_parameters()]
    expected = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for i in range(len(x)):  # per-sample gradient of the joint loss, masked, clipped jointly
        reference.zero_grad()
        _joint_loss(reference, x[i : i + 1], y[i : i + 1]).backward()
        grads = {n: torch.as_tensor(p.grad).clone() for n, p in reference.named_parameters()}
        grads["student.0.weight"][~keep["student.0.weight"]] = 0.0
        norm = torch.stack([(grads[n] ** 2).sum() for n in names]).sum().sqrt()
        assert float(norm) > c  # both models contribute and the pair is clipped as one
        for n in names:
            expected[n] += min(1.0, c / (float(norm) + 1e-6)) * grads[n]
    trainer.zero_grad()
    _joint_loss(trainer.model, x, y).backward()
    trainer.step()
    for name, p in pair.named_parameters():
        summed = p.summed_grad  # type: ignore[attr-defined]  # Opacus: the clipped sum
        torch.testing.assert_close(summed, expected[name], rtol=1e-4, atol=1e-7)
    first = dict(pair.named_parameters())["student.0.weight"]
    assert bool((first[~keep["student.0.weight"]] == 0).all())


def _cfg(**changes: object) -> RunConfig:
    return RunConfig(distill=True, num_server_rounds=2, batch_size=32).replace(**changes)


def _train_round(cfg, teacher, server_round, accountant_state=None, masks=None):
    data = task.local_train_data(cfg, 0, 4)
    student = task.new_model(cfg)
    return task.train(
        cfg,
        student,
        data,
        masks=masks,
        server_round=server_round,
        node_seed=0,
        accountant_state=accountant_state,
        teacher=teacher,
    )


def test_dp_distillation_reports_the_epsilon_of_one_opacus_accountant() -> None:
    sigma = 1.1
    cfg = _cfg(dp=True, noise_multiplier=sigma)
    teacher = task.new_teacher(cfg, 0)
    before = get_weights(teacher)
    first = _train_round(cfg, teacher, 1)
    second = _train_round(
        cfg,
        task.new_teacher(cfg, 0, first.teacher_weights),
        2,
        accountant_state=first.accountant_state,
    )
    data = task.local_train_data(cfg, 0, 4)
    loader = data.to_loader(cfg.batch_size)
    accountant = RDPAccountant()  # the student and the teacher: one mechanism, one history
    accountant.history = [
        (sigma, 1 / len(loader), planned_total_steps(loader, num_rounds=1, local_epochs=1))
    ] * 2
    assert first.epsilon is not None and second.epsilon is not None
    assert 0 < first.epsilon < second.epsilon
    assert second.epsilon == pytest.approx(accountant.get_epsilon(cfg.target_delta), rel=1e-9)
    # The teacher was trained (privately) and came back under its own names and shapes.
    assert first.teacher_weights is not None
    assert {k: v.shape for k, v in first.teacher_weights.items()} == {
        k: v.shape for k, v in before.items()
    }
    assert any(not np.array_equal(first.teacher_weights[k], before[k]) for k in before)


def test_distillation_trains_both_models_and_masks_the_student_only() -> None:
    cfg = _cfg()
    student = task.new_model(cfg)
    masks = {
        name: torch.from_numpy(np.random.default_rng(0).random(w.shape) < 0.3)
        for name, w in get_weights(student).items()
        if w.ndim >= 2
    }
    teacher = task.new_teacher(cfg, 0)
    before = get_weights(teacher)
    result = _train_round(cfg, teacher, 1, masks=masks)
    for name, keep in masks.items():
        assert np.all(result.weights[name][~keep.numpy()] == 0.0)
    assert result.teacher_weights is not None
    assert all(not np.array_equal(result.teacher_weights[k], before[k]) for k in before)
    assert np.mean([np.mean(v == 0) for v in result.teacher_weights.values()]) < 0.01
    assert {k: v.shape for k, v in result.weights.items()} == {
        k: v.shape for k, v in get_weights(task.new_model(cfg)).items()
    }
    # The same round without distillation trains the student alone, and differently.
    plain = task.train(
        cfg.replace(distill=False),
        task.new_model(cfg),
        task.local_train_data(cfg, 0, 4),
        masks=masks,
        server_round=1,
        node_seed=0,
    )
    assert plain.teacher_weights is None
    assert any(not np.array_equal(plain.weights[k], result.weights[k]) for k in plain.weights)


def test_teacher_is_deterministic_per_node_and_required_exactly_with_distill() -> None:
    cfg = _cfg()
    a, b, other = task.new_teacher(cfg, 0), task.new_teacher(cfg, 0), task.new_teacher(cfg, 1)
    wa, wb, wo = get_weights(a), get_weights(b), get_weights(other)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert not all(np.array_equal(wa[k], wo[k]) for k in wa)
    with pytest.raises(ValueError, match="teacher exactly when"):
        _train_round(cfg, None, 1)
    with pytest.raises(ValueError, match="teacher exactly when"):
        _train_round(cfg.replace(distill=False), a, 1)


# -- end to end: nothing of the teacher travels ------------------------------------------------


class RecordingGrid(Grid):
    """Delegate to Flower's grid and keep every message sent and received."""

    def __init__(self, grid: Grid, seen: list[Message]) -> None:
        self.grid = grid
        self.seen = seen

    def set_run(self, run):
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs):
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.seen.extend(messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self.seen.extend(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterable[Message]:
        messages = list(messages)
        self.seen.extend(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.seen.extend(replies)
        return replies


def _simulate_recording(cfg: RunConfig, nodes: int) -> tuple[RunSummary, list[Message]]:
    """Run ``cfg`` in Flower's simulation engine with the fedprune apps, recording the grid."""
    seen: list[Message] = []
    summaries: list[RunSummary] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        summaries.append(server_run(RecordingGrid(grid, seen), cfg))

    run_simulation(
        server_app=server_app,
        client_app=make_client_app(cfg),
        num_supernodes=nodes,
        backend_config=backend_config(quiet=True),
    )
    assert summaries, "the run ended without a result"
    return summaries[0], seen


@pytest.mark.slow
def test_no_teacher_parameter_travels_and_bytes_equal_the_plain_student(tmp_path: Path) -> None:
    nodes = 3
    base = RunConfig(
        results_dir=str(tmp_path),
        num_server_rounds=3,
        min_train_nodes=nodes,
        target_density=0.5,
        prune_end_round=2,
        entropy=False,  # no zlib: payload sizes depend on the kept entries only
        teacher_model="mlp-large",
    )
    plain, _ = _simulate_recording(base.replace(run_name="plain"), nodes)
    distilled, seen = _simulate_recording(base.replace(run_name="kd", distill=True), nodes)

    student = get_weights(task.new_model(base))
    teacher = get_weights(task.new_teacher(base.replace(distill=True), 0))
    teacher_size = sum(v.size for v in teacher.values())
    student_shapes = {name: w.shape for name, w in student.items()}
    # Shapes only the teacher has (its 512-wide layers): none may appear anywhere.
    teacher_only = {w.shape for w in teacher.values()} - set(student_shapes.values())
    assert teacher_only
    replies = [m for m in seen if m.metadata.reply_to_message_id]
    assert len(replies) >= nodes * base.num_server_rounds
    assert len(seen) > len(replies)
    for message in seen:
        assert message.has_content(), message.error
        content = message.content
        assert not any("teacher" in name for name in content), list(content)
        assert keys.STATE_TEACHER not in content
        travelling = 0
        for name in content.array_records:
            arrays = from_record(content.array_records[name])
            travelling += sum(a.nbytes for a in arrays.values())
            assert not any(a.shape in teacher_only for a in arrays.values())
            if codec.KEY_META in arrays:  # a payload: the tensors it describes are the student's
                for entry in codec._parse_layout(arrays).entries:
                    assert student_shapes[entry.name] == entry.shape, (name, entry.name)
            else:  # a mask vote of packed bits, one array per student tensor
                assert set(arrays) <= set(student_shapes), name
        scalar_keys = [list(content.config_records[n]) for n in content.config_records]
        scalar_keys += [list(content.metric_records[n]) for n in content.metric_records]
        for record_keys in scalar_keys:
            assert not any("teacher" in key for key in record_keys), record_keys
        # Not even an int8 copy of the teacher would fit in what this message carries.
        assert travelling < teacher_size
    # The same student, mask sizes and codec: the same payload sizes. Flower's framing of the
    # other values (metrics, vote scales) varies by a few bytes in 450 kB with the numbers.
    assert distilled.bytes_up == pytest.approx(plain.bytes_up, rel=1e-4)
    assert distilled.bytes_down == pytest.approx(plain.bytes_down, rel=1e-4)
    assert distilled.final_accuracy > 0.5
    # ... and the clients did distil (the same run without a teacher learns differently).
    assert distilled.final_accuracy != plain.final_accuracy


def test_client_app_keeps_the_teacher_in_its_state_and_replies_with_the_student_only(
    tmp_path: Path,
) -> None:
    cfg = RunConfig(strategy="fedavg", target_density=1.0, distill=True, results_dir=str(tmp_path))
    student = get_weights(task.new_model(cfg))
    node: dict[str, bool | float | int | str] = {keys.PARTITION_ID: 1, keys.NUM_PARTITIONS: 4}
    kept, fresh = Context(1, 7, node, RecordDict(), {}), Context(1, 7, node, RecordDict(), {})
    teachers = []
    with server_task_identity():
        for server_round, context in ((1, kept), (2, kept), (2, fresh)):
            content = RecordDict(
                {
                    keys.ARRAYS: to_record(student),
                    keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round}),
                }
            )
            message = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
            reply = client_app.train(message, context, cfg)
            assert set(reply.content) == {keys.ARRAYS, keys.METRICS}
            sent = from_record(reply.content.array_records[keys.ARRAYS])
            assert {k: v.shape for k, v in sent.items()} == {k: v.shape for k, v in student.items()}
            teachers.append(from_record(context.state.array_records[keys.STATE_TEACHER]))
    first, second, from_scratch = teachers
    expected = get_weights(task.new_teacher(cfg, 1))
    assert {k: v.shape for k, v in first.items()} == {k: v.shape for k, v in expected.items()}
    # Round 2 continued from the teacher kept after round 1, not from a new one.
    assert any(not np.array_equal(second[k], from_scratch[k]) for k in second)
    assert any(not np.array_equal(first[k], second[k]) for k in first)
