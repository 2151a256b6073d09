"""Datasets and label-skewed partitions for simulations.

Nothing here imports TensorFlow unless a dataset has to be fetched through
``keras.datasets`` (only when no local copy exists).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path

import numpy as np

DATASETS = ("digits", "fashion_mnist", "mnist")
SPLIT_SEED = 0

#: Where Debian's ``fashion-mnist`` package (and similar) put the IDX files.
IDX_DIRS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist", "/usr/share/datasets/fashion_mnist"),
    "mnist": ("/usr/share/datasets/mnist",),
}
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Dataset = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (optionally gzipped): the format MNIST-style datasets ship in."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    shape = struct.unpack_from(f">{ndim}I", raw, 4)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    start = 4 + 4 * ndim
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - start != count * dtype.itemsize:
        raise ValueError(f"{path}: header says shape {shape} but the file has {len(raw) - start} data bytes")
    return np.frombuffer(raw, dtype=dtype, offset=start).reshape(shape)


def _find_idx_dir(name: str, data_dir: str | os.PathLike[str] | None) -> Path | None:
    candidates = [Path(data_dir)] if data_dir is not None else [Path(d) for d in IDX_DIRS.get(name, ())]
    for directory in candidates:
        if all(_idx_path(directory, base) is not None for base in _IDX_FILES.values()):
            return directory
    return None


def has_local_copy(name: str, data_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when the dataset's IDX files are on disk (``data_dir``, else the Debian package's folder)."""
    return name == "digits" or _find_idx_dir(name, data_dir) is not None


def _idx_path(directory: Path, base: str) -> Path | None:
    # Debian ships "train-images-idx3-ubyte.gz"; other mirrors use "train-images.idx3-ubyte".
    for stem in (base, base.replace("-idx", ".idx")):
        for suffix in (".gz", ""):
            path = directory / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def _load_image_dataset(name: str, data_dir: str | os.PathLike[str] | None) -> Dataset:
    directory = _find_idx_dir(name, data_dir)
    if directory is not None:
        parts = {key: read_idx(_idx_path(directory, base)) for key, base in _IDX_FILES.items()}  # type: ignore[arg-type]
        x_train, y_train, x_test, y_test = parts["x_train"], parts["y_train"], parts["x_test"], parts["y_test"]
    elif data_dir is not None:
        raise FileNotFoundError(f"no {name} IDX files ({', '.join(_IDX_FILES.values())}[.gz]) in {data_dir}")
    else:
        try:
            import keras

            loader = getattr(keras.datasets, name)
            (x_train, y_train), (x_test, y_test) = loader.load_data()
        except Exception as exc:
            searched = ", ".join(IDX_DIRS.get(name, ()))
            raise RuntimeError(
                f"cannot load {name}: no IDX files in {searched} and keras.datasets.{name}.load_data() failed "
                f"({type(exc).__name__}: {exc}). Install the dataset locally (e.g. Debian's '{name.replace('_', '-')}' "
                f"package), pass data_dir=, or go online once so Keras caches it."
            ) from exc
    return (
        np.asarray(x_train, dtype=np.float32) / 255.0,
        np.asarray(y_train, dtype=np.int64),
        np.asarray(x_test, dtype=np.float32) / 255.0,
        np.asarray(y_test, dtype=np.int64),
    )


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=SPLIT_SEED)
    return x_train, y_train, x_test, y_test


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, data_dir: str | None) -> Dataset:
    if name == "digits":
        return _load_digits()
    return _load_image_dataset(name, data_dir)


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Return ``(x_train, y_train, x_test, y_test)``: float32 features in [0, 1], int64 labels.

    Cached per process (threads of one simulation share the arrays, so they are read-only).
    """
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    arrays = _load_cached(key, None if data_dir is None else str(data_dir))
    for array in arrays:
        array.flags.writeable = False
    return arrays


def label_groups(labels: np.ndarray, num_nodes: int) -> list[np.ndarray]:
    """Split the sorted distinct labels into ``num_nodes`` contiguous chunks (some empty if too few labels)."""
    return [np.asarray(chunk) for chunk in np.array_split(np.unique(labels), num_nodes)]


def partition_label_skew(labels: np.ndarray, num_nodes: int, skew: float, seed: int = 0) -> list[np.ndarray]:
    """Index arrays, one per node, with label skew as in the flwr-serverless paper.

    Node ``k`` owns the ``k``-th contiguous chunk of the sorted labels. Each
    example goes to its label's owner with probability ``skew``, otherwise to a
    node drawn uniformly from all nodes. ``skew=0`` is IID; ``skew=1`` gives
    every node only its own labels.
    """
    if num_nodes < 1:
        raise ValueError("num_nodes must be at least 1")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew}")
    labels = np.asarray(labels).reshape(-1)
    owner_of_label: dict[object, int] = {}
    for node, group in enumerate(label_groups(labels, num_nodes)):
        for label in group.tolist():
            owner_of_label[label] = node
    owners = np.array([owner_of_label[label] for label in labels.tolist()], dtype=np.int64)
    rng = np.random.default_rng(seed)
    follow_label = rng.random(len(labels)) < skew
    random_nodes = rng.integers(0, num_nodes, size=len(labels))
    assignment = np.where(follow_label, owners, random_nodes)
    return [np.flatnonzero(assignment == node) for node in range(num_nodes)]
