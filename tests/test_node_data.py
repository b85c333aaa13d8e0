"""Per-node data files: the simulation's partitions, loaded without partitioning."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from clients import client_app
from fedprune import keys, task
from fedprune.config import RunConfig
from fedprune.data import FASHION_MNIST_SYSTEM_DIR, ByteDataset, client_data, load_bytes
from fedprune.node_data import load_node_file, node_file_name, read_info, write_node_files
from simulations import node_data as node_data_cli

SCHEMES = [
    {"partitioning": "iid"},
    {"partitioning": "dirichlet", "alpha": 0.3},
    {"partitioning": "classes", "classes_per_client": 3},
]


def assert_same_rows(node: ByteDataset, expected_x: np.ndarray, expected_y: np.ndarray) -> None:
    as_float = node.to_float()
    assert as_float.x.dtype == np.float32
    np.testing.assert_array_equal(as_float.x, expected_x)  # bit-identical, not approximate
    np.testing.assert_array_equal(node.y, expected_y)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s["partitioning"])
def test_node_files_hold_exactly_the_simulations_partitions(
    tmp_path: Path, scheme: dict[str, object]
) -> None:
    cfg = RunConfig(dataset="digits", seed=3).replace(**scheme)
    paths = write_node_files("digits", 5, tmp_path, seed=3, **scheme)  # type: ignore[arg-type]
    assert [p.name for p in paths] == [node_file_name(i) for i in range(5)]
    train_rows, test_rows = 0, 0
    for pid, path in enumerate(paths):
        node = load_node_file(path)
        assert (node.info.partition_id, node.info.num_partitions) == (pid, 5)
        expected = task.local_train_data(cfg, pid, 5)
        assert_same_rows(node.train, expected.x, expected.y)
        held_out = task.local_eval_data(cfg, pid, 5)
        assert_same_rows(node.test, held_out.x, held_out.y)
        train_rows, test_rows = train_rows + len(node.train), test_rows + len(node.test)
    if scheme["partitioning"] != "classes":
        assert (train_rows, test_rows) == (1437, 360)


@pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="Debian package dataset-fashion-mnist"
)
def test_fashion_mnist_node_file_is_the_simulations_partition_in_uint8(tmp_path: Path) -> None:
    (path,) = write_node_files("fashion-mnist", 2, tmp_path, partition_ids=[1])
    node = load_node_file(path)
    assert node.train.x.dtype == np.uint8 and node.train.x.shape[1:] == (1, 28, 28)
    expected = client_data("fashion-mnist", 1, 2, scheme="dirichlet", alpha=0.5, seed=0)
    assert_same_rows(node.train, expected.x, expected.y)
    # Compact: one byte per pixel (compressed), against four for the float32 rows.
    assert path.stat().st_size < expected.x.nbytes / 4


def test_byte_loader_yields_the_float_loaders_batches() -> None:
    train, _ = load_bytes("digits")
    floats = train.to_float()
    a = train.to_loader(32, shuffle=True, generator=torch.Generator().manual_seed(7))
    b = floats.to_loader(32, shuffle=True, generator=torch.Generator().manual_seed(7))
    pairs = list(zip(a, b, strict=True))
    assert len(pairs) == -(-len(train) // 32)
    for (xa, ya), (xb, yb) in pairs:
        assert xa.dtype == torch.float32 and ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_node_file_made_for_other_settings_is_refused(tmp_path: Path) -> None:
    (path,) = write_node_files("digits", 4, tmp_path, alpha=0.5, partition_ids=[0])
    cfg = RunConfig(dataset="digits", partitioning="dirichlet", alpha=0.5)
    assert len(task.local_train_data(cfg, 0, 4, data_path=str(path))) > 0
    changes: list[tuple[dict[str, Any], str]] = [
        ({"alpha": 0.1}, "alpha=0.5"),
        ({"seed": 1}, "seed=0"),
        ({"partitioning": "iid"}, "partitioning='dirichlet'"),
        ({"dataset": "fashion-mnist", "model": "cnn"}, "dataset='digits'"),
    ]
    for change, named in changes:
        with pytest.raises(ValueError, match=named):
            task.local_train_data(cfg.replace(**change), 0, 4, data_path=str(path))
    # alpha is not part of an iid file's identity.
    (iid,) = write_node_files(
        "digits", 4, tmp_path / "iid", partitioning="iid", alpha=0.9, partition_ids=[0]
    )
    task.local_train_data(cfg.replace(partitioning="iid", alpha=0.2), 0, 4, data_path=str(iid))


def test_bad_files_get_an_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.npz"
    with pytest.raises(ValueError, match=r"absent\.npz"):
        load_node_file(missing)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz"):
        load_node_file(junk)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a node data file"):
        read_info(other)
    (good,) = write_node_files("digits", 2, tmp_path / "ok", partition_ids=[0])
    with np.load(good, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(tmp_path / "old.npz", **{**arrays, "info": np.array('{"format": 0}')})
    with pytest.raises(ValueError, match="format 0"):
        load_node_file(tmp_path / "old.npz")
    with pytest.raises(ValueError, match=r"partition ids \[2\]"):
        write_node_files("digits", 2, tmp_path, partition_ids=[2])


def context(node_config: Mapping[str, str | int]) -> Context:
    return Context(
        run_id=1, node_id=1, node_config=dict(node_config), state=RecordDict(), run_config={}
    )


def test_node_config_takes_the_partition_from_the_file(tmp_path: Path) -> None:
    (path,) = write_node_files("digits", 3, tmp_path, partition_ids=[2])
    by_file = {keys.DATA_PATH: str(path)}
    assert client_app.node_partition(context(by_file)) == (2, 3)
    same: dict[str, str | int] = {**by_file, keys.PARTITION_ID: 2, keys.NUM_PARTITIONS: 3}
    assert client_app.node_partition(context(same)) == (2, 3)
    with pytest.raises(ValueError, match="partition-id=1 \\(file: 2\\)"):
        client_app.node_partition(context({**same, keys.PARTITION_ID: 1}))
    with pytest.raises(ValueError, match="not both"):
        client_app.node_partition(context({**by_file, keys.DATA_DIR: str(tmp_path)}))
    with pytest.raises(ValueError, match="data-path"):
        client_app.node_partition(context({}))


def test_cli_writes_one_file_per_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--dataset", "digits", "--num-partitions", "3", "--out", str(tmp_path)]
    assert node_data_cli.main([*argv, "--partitioning", "iid", "--seed", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [node_file_name(i) for i in range(3)]
    assert read_info(tmp_path / node_file_name(1)).seed == 2
    with pytest.raises(SystemExit):
        node_data_cli.main([*argv, "--partition-id", "5"])


@pytest.mark.slow
def test_client_memory_probe_trains_one_round_on_a_node_file(tmp_path: Path) -> None:
    from simulations.client_memory import measure_client_memory

    (path,) = write_node_files("digits", 2, tmp_path, partition_ids=[0])
    measured = measure_client_memory("digits", "mlp", data_path=path)
    assert measured.data == "file"
    assert measured.num_examples == len(load_node_file(path).train)
    assert 0 < measured.imports_mb <= measured.data_mb <= measured.peak_mb
    assert measured.round_mb == round(measured.peak_mb - measured.imports_mb, 1)
