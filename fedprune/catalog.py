"""What a run config can name, known without importing torch or Opacus.

Datasets (with the shape of one example and the number of classes), partition schemes, models
and privacy accountants. :mod:`fedprune.config` validates against these names, so parsing a
config stays cheap; the modules that implement them (:mod:`fedprune.data`,
:mod:`fedprune.models`, :mod:`fedprune.privacy`) import them from here.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

DatasetName = Literal["digits", "fashion-mnist", "mnist", "cifar10"]
DATASETS: Final[tuple[str, ...]] = get_args(DatasetName)
DATASET_SHAPES: Final[dict[str, tuple[tuple[int, ...], int]]] = {
    "digits": ((1, 8, 8), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}
"""Dataset -> (shape of one example, number of classes), known without loading it."""
PartitionScheme = Literal["iid", "dirichlet", "classes"]
PARTITION_SCHEMES: Final[tuple[str, ...]] = get_args(PartitionScheme)

ModelName = Literal["mlp", "mlp-small", "mlp-large", "cnn", "cnn-mcmahan", "resnet18"]
MODELS: Final[tuple[str, ...]] = get_args(ModelName)

AccountantName = Literal["rdp", "prv"]
"""Opacus accountants supported here (both keep a ``(sigma, q, steps)`` history)."""
