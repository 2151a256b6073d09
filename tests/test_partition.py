"""Label-skewed partitions (as in the flwr-serverless paper) and the simulation datasets."""

from __future__ import annotations

import gzip
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from flwr_serverless.simulation import data as sim_data
from flwr_serverless.simulation.data import label_groups, load_dataset, partition_label_skew, read_idx

# 10 labels x 1000 examples, shuffled: large enough for tight statistical bounds.
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 1000))


@pytest.mark.parametrize("num_nodes", [1, 2, 3, 7, 12])
@pytest.mark.parametrize("skew", [0.0, 0.5, 0.9, 1.0])
def test_every_example_goes_to_exactly_one_node(num_nodes: int, skew: float) -> None:
    parts = partition_label_skew(LABELS, num_nodes, skew, seed=1)
    assert len(parts) == num_nodes
    merged = np.concatenate(parts)
    assert len(merged) == len(LABELS)
    np.testing.assert_array_equal(np.sort(merged), np.arange(len(LABELS)))


def test_label_groups_are_contiguous_chunks_of_sorted_labels() -> None:
    groups = [g.tolist() for g in label_groups(LABELS, 3)]
    assert groups == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [g.tolist() for g in label_groups(np.array([5, 1, 3]), 5)] == [[1], [3], [5], [], []]


def test_skew_09_two_nodes_keeps_about_95_percent_in_own_group() -> None:
    # P(own group) = skew + (1 - skew) / num_nodes = 0.95 of each group's examples stay home;
    # groups are equal-sized, so 95% of a node's examples are from its group.
    parts = partition_label_skew(LABELS, 2, 0.9, seed=7)
    for node, (part, group) in enumerate(zip(parts, label_groups(LABELS, 2))):
        own = np.isin(LABELS[part], group).mean()
        assert abs(own - 0.95) < 0.015, (node, own)  # sd is ~0.003 here
        assert abs(len(part) - 5000) < 250


def test_skew_1_gives_each_node_only_its_labels() -> None:
    parts = partition_label_skew(LABELS, 3, 1.0, seed=0)
    for part, group in zip(parts, label_groups(LABELS, 3)):
        assert set(np.unique(LABELS[part]).tolist()) == set(group.tolist())


def test_skew_0_is_iid() -> None:
    parts = partition_label_skew(LABELS, 3, 0.0, seed=3)
    for part in parts:
        assert abs(len(part) - len(LABELS) / 3) < 200
        fractions = np.bincount(LABELS[part], minlength=10) / len(part)
        assert np.all(np.abs(fractions - 0.1) < 0.025), fractions


def test_partition_is_reproducible_from_the_seed() -> None:
    a = partition_label_skew(LABELS, 3, 0.9, seed=5)
    b = partition_label_skew(LABELS, 3, 0.9, seed=5)
    c = partition_label_skew(LABELS, 3, 0.9, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_partition_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="skew"):
        partition_label_skew(LABELS, 2, 1.5)
    with pytest.raises(ValueError, match="num_nodes"):
        partition_label_skew(LABELS, 0, 0.5)


def test_digits_split_is_stratified_scaled_and_fixed() -> None:
    x_train, y_train, x_test, y_test = load_dataset("digits")
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert np.issubdtype(y_train.dtype, np.integer)
    assert x_train.shape[1:] == (64,) and len(x_train) + len(x_test) == 1797
    assert abs(len(x_test) / 1797 - 0.25) < 0.01
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    # stratified: each class' share of the test set matches the train set
    np.testing.assert_allclose(np.bincount(y_test) / len(y_test), np.bincount(y_train) / len(y_train), atol=0.01)
    again = sim_data._load_digits()
    np.testing.assert_array_equal(again[1], y_train)


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_are_read_gzipped_or_not(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=12, dtype=np.uint8)
    for prefix, count in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images[:count], compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels[:count], compress)
    x_train, _, x_test, y_test = load_dataset("fashion_mnist", data_dir=tmp_path)
    assert x_train.shape == (12, 28, 28) and x_test.shape == (5, 28, 28)
    assert x_train.dtype == np.float32 and x_train.max() <= 1.0
    np.testing.assert_allclose(x_train * 255.0, images, atol=1e-3)
    np.testing.assert_array_equal(y_test, labels[:5])


def test_idx_reader_rejects_truncated_files(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(struct.pack(">BBBBI", 0, 0, 0x08, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(path)


def test_missing_image_dataset_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="IDX"):
        load_dataset("mnist", data_dir=tmp_path)

    # No local copy and no network: the Keras fallback fails, and the error says what to do.
    def offline() -> None:
        raise OSError("network unreachable")

    fake_keras = types.SimpleNamespace(datasets=types.SimpleNamespace(mnist=types.SimpleNamespace(load_data=offline)))
    monkeypatch.setitem(sys.modules, "keras", fake_keras)
    monkeypatch.setitem(sim_data.IDX_DIRS, "mnist", (str(tmp_path),))
    sim_data._load_cached.cache_clear()
    with pytest.raises(RuntimeError, match=r"cannot load mnist.*network unreachable"):
        load_dataset("mnist")
    sim_data._load_cached.cache_clear()


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar100")
