"""Run a federated simulation on one machine: N nodes in threads or spawned processes, plus baselines.

The runner never imports a deep-learning framework itself: it partitions the
data, hands each node a ``NodeTask`` and lets the framework's worker module
(``keras_worker`` or ``lightning_worker``) do the training. Workers return
plain dicts, so processes never pickle models.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flwr_serverless.simulation.baselines import BaselineCache, centralized_key, standalone_key
from flwr_serverless.simulation.data import load_dataset
from flwr_serverless.simulation.execution import WORKERS, run_locally
from flwr_serverless.simulation.options import (
    FEDPROX_DEFAULT_MU,
    NON_WAITING_MODES,
    AsyncOptions,
    Evaluation,
    Heterogeneity,
    SemiSyncOptions,
    check_execution,
    check_mode,
    check_strategy,
    option_name,
    strategy_key,
)
from flwr_serverless.simulation.partitions import Partitioning
from flwr_serverless.simulation.results import NodeResult, SimulationResult
from flwr_serverless.simulation.update_options import CompressionOptions, check_aggregate
from flwr_serverless.validation import check_choice, check_int, check_number, check_positive, check_positive_int

ProgressFn = Callable[[dict[str, Any]], None]

MODES = ("async", "sync", "semisync", "aggregate")
DEFAULT_SKEW = 0.9
DEFAULT_SYNC_TIMEOUT = 120.0
#: node kwargs the simulation sets itself; ``node_options`` may not override them
RESERVED_NODE_OPTIONS = frozenset(
    {
        "store",
        "strategy",
        "node_id",
        "num_nodes",
        "timeout",
        "min_nodes",
        "lambda_",
        "reestimate",
        "staleness",
        "staleness_unit",
        "alpha",
        "buffer_size",
        "participation",
        "seed",
    }
)
_SECRET_OPTION_WORDS = ("secret", "key", "token", "password", "credential")


@dataclass
class SimulationConfig:
    """Everything one simulation run needs; plain values only, so it crosses process boundaries."""

    num_nodes: int = 2
    mode: str = "async"  # "async" (never waits), "sync" (barrier per epoch), "semisync" (barrier per time budget)
    #                      or "aggregate" (async FedAvg through one compare-and-swap object: O(1) reads per epoch)
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)  # Flower strategy kwargs (server_momentum...)
    store_url: str | None = None  # None: a fresh local folder under the temp dir
    storage_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 5
    dataset: str = "digits"
    data_dir: str | None = None
    skew: float = DEFAULT_SKEW  # label skew of the default partitioner ("skew", the paper's split)
    partitioning: Partitioning = field(default_factory=Partitioning)  # or a Flower Datasets partitioner
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    use_processes: bool = False
    workers: int | None = None  # processes: size of the pool hosting the nodes (None: one per node, up to 8)
    engine: str = "local"  # "local" (threads or processes here) or "ray" (Ray tasks; see ray_engine)
    ray_address: str | None = None  # engine "ray": the cluster to join (None: RAY_ADDRESS or a local Ray)
    framework: str = "keras"
    sync_timeout: float | None = None  # sync/semisync: seconds to wait for the others (None: 120)
    min_nodes: int | None = None  # sync/semisync: continue with this many nodes after the timeout
    baselines: bool = True  # also train standalone nodes and a centralized model
    baseline_cache: str | None = None  # folder: each baseline is trained once per (data, seed, partition, model)
    max_train_examples: int | None = None  # subsample the training set for quick runs
    node_options: dict[str, Any] = field(default_factory=dict)  # extra node kwargs (secret, max_object_bytes...)
    proximal_mu: float | None = None  # FedProx term, applied by the callbacks (None: 0, or 0.01 for fedprox)
    async_options: AsyncOptions = field(default_factory=AsyncOptions)
    semisync: SemiSyncOptions = field(default_factory=SemiSyncOptions)
    heterogeneity: Heterogeneity = field(default_factory=Heterogeneity)
    evaluation: Evaluation = field(default_factory=Evaluation)
    compression: CompressionOptions = field(default_factory=CompressionOptions)  # what every node publishes

    def validate(self) -> None:
        """Fail before any training starts, with a message naming the bad option."""
        check_positive_int("num_nodes", self.num_nodes)
        check_choice("mode", self.mode, MODES)
        check_choice("framework", self.framework, WORKERS)
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_number("skew", self.skew, 0.0, 1.0)
        self.partitioning.validate(self.skew, DEFAULT_SKEW)
        check_positive("learning_rate", self.learning_rate)
        check_positive_int("max_train_examples", self.max_train_examples, none=True)
        if self.use_processes and self.store_url is not None and self.store_url.startswith("memory://"):
            raise ValueError("memory:// stores live inside one process; use threads or a file:// or s3:// store")
        self._validate_waiting()
        check_execution(self.engine, self.ray_address, self.use_processes, self.workers, self.store_url)
        check_number(option_name("proximal_mu", "--proximal-mu"), self.proximal_mu, 0.0, none=True)
        reserved = sorted(set(self.node_options) & RESERVED_NODE_OPTIONS)
        if reserved:
            raise ValueError(f"node_options may not set {', '.join(reserved)}: the simulation sets them")
        check_strategy(self.strategy, self.strategy_options)
        check_mode(self.mode, self.async_options, self.semisync)
        self.effective_compression.validate(self.mode)
        if self.mode == "aggregate":
            check_aggregate(self.strategy, self.strategy_options, self.store_url, self.storage_options)
        self.async_options.validate()
        self.semisync.validate()
        self.heterogeneity.validate(self.num_nodes)
        self.evaluation.validate()

    def _validate_waiting(self) -> None:
        if self.mode in NON_WAITING_MODES and (self.sync_timeout is not None or self.min_nodes is not None):
            name, flag = (
                ("sync_timeout", "--timeout") if self.sync_timeout is not None else ("min_nodes", "--min-nodes")
            )
            raise ValueError(
                f"option {name} ({flag}) applies to --mode sync and semisync only: {self.mode} nodes never wait"
            )
        check_positive(option_name("sync_timeout", "--timeout"), self.sync_timeout, unit="seconds", none=True)
        check_int(option_name("min_nodes", "--min-nodes"), self.min_nodes, 1, self.num_nodes, none=True)

    @property
    def effective_compression(self) -> CompressionOptions:
        """``compression``, or the same options given in ``node_options`` (not both)."""
        legacy = CompressionOptions.from_node_options(self.node_options)
        if legacy.given and self.compression.given:
            raise ValueError(
                "option compression (--compression) is set both in compression= and in node_options; set it once"
            )
        return self.compression if self.compression.given else legacy

    @property
    def timeout(self) -> float:
        """Seconds a sync or semi-sync node waits for the others."""
        return DEFAULT_SYNC_TIMEOUT if self.sync_timeout is None else float(self.sync_timeout)

    @property
    def effective_proximal_mu(self) -> float:
        """The FedProx mu the callbacks apply: as given, else Flower's FedProx default for ``fedprox``, else 0."""
        if self.proximal_mu is not None:
            return float(self.proximal_mu)
        return FEDPROX_DEFAULT_MU if strategy_key(self.strategy) == "fedprox" else 0.0

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-safe values, with credentials in options replaced by '***'."""
        data = asdict(self)
        for name in ("storage_options", "node_options"):
            data[name] = {k: ("***" if _looks_secret(k) else v) for k, v in data[name].items()}
        data["heterogeneity"]["slowdown"] = list(self.heterogeneity.slowdown)
        return data


def _looks_secret(option: str) -> bool:
    return any(word in option.lower() for word in _SECRET_OPTION_WORDS)


@dataclass
class NodeTask:
    """What one worker trains: a role, a name, its training indices and where to federate."""

    role: str  # "federated", "standalone" or "centralized"
    index: int
    name: str
    train_indices: np.ndarray
    config: SimulationConfig
    run_url: str | None = None

    @property
    def shuffle_seed(self) -> int:
        """Node k shuffles alike federated and standalone; the centralized run's depends on the seed only,
        so the same seed gives the same centralized baseline whatever the number of nodes.
        """
        stream = [self.config.seed, 1] if self.role == "centralized" else [self.config.seed, 0, self.index]
        return int(np.random.SeedSequence(stream).generate_state(1)[0])


# -- the simulation ------------------------------------------------------------------
def make_run_url(base: str) -> str:
    """A fresh sub-prefix per run, so a re-run never sees the nodes of an earlier one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{base.rstrip('/')}/run-{stamp}-{secrets.token_hex(3)}"


def default_store_url() -> str:
    """A new local folder under the temp dir (what the CLI uses without ``--store``)."""
    return tempfile.mkdtemp(prefix="flwr-serverless-sim-")


def run_tasks(tasks: list[NodeTask], use_processes: bool, progress: ProgressFn) -> list[dict[str, Any]]:
    """Train ``tasks`` on this machine or as Ray tasks; one plain-dict row per task, in order (errors become rows)."""
    if tasks and tasks[0].config.engine == "ray":
        from flwr_serverless.simulation.ray_engine import run_on_ray

        return run_on_ray(tasks, progress)
    return run_locally(tasks, use_processes, progress)


def _training_indices(config: SimulationConfig, num_train: int) -> np.ndarray:
    indices = np.arange(num_train)
    if config.max_train_examples is not None and config.max_train_examples < num_train:
        rng = np.random.default_rng(config.seed)
        indices = np.sort(rng.choice(num_train, size=config.max_train_examples, replace=False))
    return indices


def _run_baselines(
    config: SimulationConfig, parts: list[np.ndarray], pool: np.ndarray, report: ProgressFn
) -> tuple[list[NodeResult], NodeResult]:
    """Standalone nodes on the same partitions and a centralized model, from ``baseline_cache`` when it has them."""
    cache = BaselineCache(config.baseline_cache) if config.baseline_cache else None
    keys = {"standalone": standalone_key(config), "centralized": centralized_key(config)}
    cached = {kind: cache.load(key) if cache else None for kind, key in keys.items()}
    tasks = []
    if cached["standalone"] is None:
        tasks += [NodeTask("standalone", i, f"node-{i}", part, config) for i, part in enumerate(parts)]
    if cached["centralized"] is None:
        tasks.append(NodeTask("centralized", len(parts), "centralized", pool, config))
    if cache is not None and len(tasks) < len(parts) + 1:
        report(
            {
                "event": "phase",
                "phase": "baselines_cached",
                "cache": str(cache.directory),
                "cached": sorted(kind for kind, rows in cached.items() if rows is not None),
            }
        )
    fresh = run_tasks(tasks, config.use_processes, report)
    rows = {
        "standalone": cached["standalone"] or [r for r in fresh if r.get("role") == "standalone"],
        "centralized": cached["centralized"] or [r for r in fresh if r.get("role") == "centralized"],
    }
    if cache is not None:
        for kind, key in keys.items():
            if cached[kind] is None:
                cache.save(key, rows[kind])
    return [NodeResult.from_dict(r) for r in rows["standalone"]], NodeResult.from_dict(rows["centralized"][0])


def run_simulation(config: SimulationConfig, progress: ProgressFn | None = None) -> SimulationResult:
    """Train ``config.num_nodes`` federated nodes on label-skewed partitions, then the baselines.

    ``progress`` receives event dicts: ``{"event": "epoch_end", "role", "node",
    "epoch", "epochs", "loss", "accuracy", "accuracy_fed", ...}``, ``{"event":
    "phase", "phase": ...}`` and ``{"event": "error", ...}``; it is called from
    one thread at a time.
    """
    config.validate()
    lock = threading.Lock()

    def report(event: dict[str, Any]) -> None:
        if progress is not None:
            with lock:
                progress(event)

    started = time.monotonic()
    _, y_train, _, _ = load_dataset(config.dataset, config.data_dir)
    pool = _training_indices(config, len(y_train))
    split = config.partitioning.split(y_train[pool], config.num_nodes, config.skew, config.seed)
    parts = [pool[p] for p in split]
    empty = [f"node-{i}" for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        remedy = "a lower skew" if config.partitioning.kind == "skew" else "other partitioner options"
        raise ValueError(f"{', '.join(empty)} would get no training data; use fewer nodes or {remedy}")

    base_url = config.store_url if config.store_url is not None else default_store_url()
    run_url = make_run_url(base_url)
    federated = [NodeTask("federated", i, f"node-{i}", part, config, run_url) for i, part in enumerate(parts)]
    report(
        {
            "event": "phase",
            "phase": "federated",
            "run_url": run_url,
            "num_nodes": config.num_nodes,
            "partition_sizes": [len(p) for p in parts],
        }
    )
    nodes = [NodeResult.from_dict(row) for row in run_tasks(federated, config.use_processes, report)]

    standalone: list[NodeResult] = []
    centralized: NodeResult | None = None
    if config.baselines:
        report({"event": "phase", "phase": "baselines"})
        standalone, centralized = _run_baselines(config, parts, pool, report)

    result = SimulationResult(
        config=config,
        run_url=run_url,
        nodes=nodes,
        standalone=standalone,
        centralized=centralized,
        wall_time=time.monotonic() - started,
    )
    report({"event": "phase", "phase": "done"})
    return result
