"""Models, and moving their weights to and from ``float32`` numpy dicts.

Models
------
All pass Opacus' ``ModuleValidator`` (no BatchNorm). Their prunable
tensors (``Linear`` / ``Conv`` weights) are what :mod:`fedprune.pruning` scores.

``"mlp"``
    ``nn.Sequential(Flatten, Linear, ReLU, ..., Linear)`` with ``hidden`` widths.
``"mlp-small"``, ``"mlp-large"``
    The same MLP with fixed hidden widths ``(64, 64)`` and ``(512, 512)`` (``hidden`` is
    ignored): a compact student and a larger teacher for knowledge distillation
    (:mod:`fedprune.distill`).
``"cnn"``
    ``nn.Sequential(Conv3x3, ReLU, MaxPool2, Conv3x3, ReLU, MaxPool2, Flatten, Linear)`` with
    ``channels`` filters (padding 1); needs ``H, W >= 4``.
``"cnn-mcmahan"``
    The CNN of McMahan et al. (2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data"): two 5x5 convolutions of 32 and 64 filters (padding 2), each followed
    by ReLU and a 2x2 max-pool, a 512-unit dense layer with ReLU, and the output layer
    (1,663,370 parameters on 28x28 grey images); needs ``H, W >= 4``.
``"resnet18"``
    torchvision's ResNet-18 with ``GroupNorm(32, C)`` in place of every BatchNorm and a
    CIFAR stem (3x3 conv, stride 1, no max-pool); torchvision's initialisation.

Parameter counts with the defaults (``hidden=(200, 200)``, ``channels=(32, 64)``, 10 classes):

=============  ==================  ==================  ==================
model          digits (1, 8, 8)    (Fashion-)MNIST     CIFAR-10 (3, 32,
                                   (1, 28, 28)         32)
=============  ==================  ==================  ==================
mlp            55,210              199,210             656,810
mlp-small      8,970               55,050              201,482
mlp-large      301,066             669,706             1,841,162
cnn            21,386              50,186              60,362
cnn-mcmahan    188,810             1,663,370           2,156,490
resnet18       11,172,810          11,172,810          11,173,962
=============  ==================  ==================  ==================

Initialisation is deterministic: either seed torch's global generator before
:func:`build_model`, or pass a ``torch.Generator`` (then the global generator is left
untouched).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedprune.catalog import MODELS, ModelName

__all__ = [
    "MODELS",
    "ModelName",
    "build_model",
    "get_weights",
    "model_num_params",
    "model_size",
    "set_weights",
]

MLP_WIDTHS: Final[dict[str, tuple[int, ...]]] = {"mlp-small": (64, 64), "mlp-large": (512, 512)}
"""Fixed hidden widths of the named MLP variants."""
GROUP_NORM_GROUPS: Final = 32
"""Groups of every ``GroupNorm`` in ``"resnet18"`` (its widths are 64 .. 512)."""


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (200, 200),
    channels: tuple[int, int] = (32, 64),
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build a freshly initialised classifier.

    Parameters
    ----------
    name : {"mlp", "mlp-small", "mlp-large", "cnn", "cnn-mcmahan", "resnet18"}
        The architecture (see the module docstring).
    input_shape : sequence of int
        Shape of one example: ``(C, H, W)``, or ``(D,)`` for ``"mlp"`` only.
    num_classes : int
        Number of output logits, ``>= 1``.
    hidden : sequence of int
        Hidden widths of ``"mlp"`` (empty: a linear model).
    channels : tuple of int
        Filters of the two convolutions of ``"cnn"``.
    generator : torch.Generator, optional
        Source of the initialisation; when omitted, torch's global generator is used.

    Returns
    -------
    torch.nn.Module
        The model in training mode, ``float32`` on the CPU.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; expected one of {MODELS}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) or (D,) of positive sizes, got {shape}")
    if not name.startswith("mlp") and len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) for model {name!r}, got {shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if generator is None:
        return _build(name, shape, num_classes, hidden, channels)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name, shape, num_classes, hidden, channels)


def _build(
    name: str,
    shape: tuple[int, ...],
    num_classes: int,
    hidden: Sequence[int],
    channels: tuple[int, int],
) -> nn.Module:
    if name == "mlp":
        return _mlp(math.prod(shape), num_classes, hidden)
    if name in MLP_WIDTHS:
        return _mlp(math.prod(shape), num_classes, MLP_WIDTHS[name])
    if name == "cnn":
        return _cnn(shape, num_classes, channels)
    if name == "cnn-mcmahan":
        return _cnn_mcmahan(shape, num_classes)
    return _resnet18(shape[0], num_classes)


def _mlp(in_features: int, num_classes: int, hidden: Sequence[int]) -> nn.Sequential:
    widths = [in_features, *(int(h) for h in hidden)]
    if min(widths) < 1:
        raise ValueError(f"hidden widths must be >= 1, got {tuple(hidden)}")
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def _cnn(shape: tuple[int, ...], num_classes: int, channels: tuple[int, int]) -> nn.Sequential:
    c, h, w = shape
    c1, c2 = (int(k) for k in channels)
    if min(c1, c2) < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if min(h, w) < 4:
        raise ValueError(
            f"input_shape needs H, W >= 4 for model 'cnn' (two 2x2 pools), got {shape}"
        )
    return nn.Sequential(
        nn.Conv2d(c, c1, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (h // 4) * (w // 4), num_classes),
    )


def _cnn_mcmahan(shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    c, h, w = shape
    if min(h, w) < 4:
        raise ValueError(
            f"input_shape needs H, W >= 4 for model 'cnn-mcmahan' (two 2x2 pools), got {shape}"
        )
    return nn.Sequential(
        nn.Conv2d(c, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (h // 4) * (w // 4), 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def _group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(GROUP_NORM_GROUPS, num_channels), num_channels)


def _resnet18(in_channels: int, num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes, norm_layer=_group_norm)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def model_num_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Count a model's parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    trainable_only : bool
        Count only parameters with ``requires_grad``.

    Returns
    -------
    int
        Number of scalar parameters (buffers excluded).
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_size(name: str, *, input_shape: Sequence[int], num_classes: int) -> int:
    """Count the parameters of model ``name`` without allocating it (built on torch's meta device).

    Parameters
    ----------
    name : str
        A model name, see :func:`build_model`.
    input_shape : sequence of int
        Shape of one example.
    num_classes : int
        Number of output logits.

    Returns
    -------
    int
        Number of scalar parameters, as :func:`model_num_params` counts them.
    """
    with torch.device("meta"):
        model = build_model(name, input_shape=input_shape, num_classes=num_classes)
    return model_num_params(model)


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def get_weights(model: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """Copy a model's floating-point tensors into ``float32`` numpy arrays.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    dict of str to numpy.ndarray
        ``state_dict`` name -> ``float32`` array (a copy), in ``state_dict`` order; integer
        buffers (e.g. BatchNorm's ``num_batches_tracked``) are left out.
    """
    return {
        k: v.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy()
        for k, v in _float_state(model).items()
    }


def set_weights(model: nn.Module, weights: Mapping[str, npt.NDArray[np.floating]]) -> None:
    """Copy ``float32`` numpy arrays into a model's floating-point tensors, in place.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its tensors keep their dtype and device.
    weights : mapping of str to numpy.ndarray
        Exactly the names :func:`get_weights` returns, with matching shapes.

    Raises
    ------
    ValueError
        Missing or unexpected names, a shape mismatch, or a non-floating array.
    """
    targets = _float_state(model)
    missing = [k for k in targets if k not in weights]
    unexpected = [k for k in weights if k not in targets]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model: missing {missing}, unexpected {unexpected}"
        )
    for key, target in targets.items():
        value = np.asarray(weights[key])
        if value.shape != tuple(target.shape):
            raise ValueError(
                f"weights[{key!r}] has shape {value.shape}, the model expects {tuple(target.shape)}"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"weights[{key!r}] must be a floating array, got {value.dtype}")
    with torch.no_grad():
        for key, target in targets.items():
            value = np.asarray(weights[key])
            if target.device.type == "cpu" and target.dtype != torch.bfloat16:
                # Straight into the tensor's memory: no intermediate tensor, works for
                # read-only arrays (e.g. decoded from a message buffer).
                np.copyto(target.numpy(), value, casting="same_kind")
            else:
                target.copy_(torch.tensor(value))
