"""Local simulation of serverless federated learning: nodes in threads or processes, plus baselines.

Importing this package does not import TensorFlow, Keras or torch; the
framework is loaded by the worker that trains a node.
"""

from flwr_serverless.simulation.data import DATASETS, load_dataset, partition_label_skew
from flwr_serverless.simulation.models import build_keras_model
from flwr_serverless.simulation.options import AsyncOptions, Evaluation, Heterogeneity, SemiSyncOptions
from flwr_serverless.simulation.partitions import PARTITIONERS, Partitioning
from flwr_serverless.simulation.runner import (
    NodeResult,
    NodeTask,
    SimulationConfig,
    SimulationResult,
    make_run_url,
    run_simulation,
)
from flwr_serverless.simulation.update_options import CompressionOptions

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "AsyncOptions",
    "CompressionOptions",
    "Evaluation",
    "Heterogeneity",
    "NodeResult",
    "NodeTask",
    "Partitioning",
    "SemiSyncOptions",
    "SimulationConfig",
    "SimulationResult",
    "build_keras_model",
    "load_dataset",
    "make_run_url",
    "partition_label_skew",
    "run_simulation",
]
