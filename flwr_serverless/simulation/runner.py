"""Run a federated simulation on one machine: N nodes in threads or spawned processes, plus baselines.

The runner never imports a deep-learning framework itself: it partitions the
data, hands each node a ``NodeTask`` and lets the framework's worker module
(``keras_worker``; later ``lightning_worker``) do the training. Workers return
plain dicts, so processes never pickle models.
"""

from __future__ import annotations

import importlib
import multiprocessing
import queue
import secrets
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from flwr_serverless.simulation.data import load_dataset, partition_label_skew

ProgressFn = Callable[[dict[str, Any]], None]

#: framework name -> module exposing ``train_node(task, progress) -> dict``
WORKERS: dict[str, str] = {
    "keras": "flwr_serverless.simulation.keras_worker",
    "lightning": "flwr_serverless.simulation.lightning_worker",
}
MODES = ("async", "sync", "semisync")
_SECRET_OPTION_WORDS = ("secret", "key", "token", "password", "credential")


@dataclass
class SimulationConfig:
    """Everything one simulation run needs; plain values only, so it crosses process boundaries."""

    num_nodes: int = 2
    mode: str = "async"  # "async" (FedAvgAsync, never waits) or "sync" (barrier per epoch)
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    store_url: str | None = None  # None: a fresh local folder under the temp dir
    storage_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 5
    dataset: str = "digits"
    data_dir: str | None = None
    skew: float = 0.9
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    use_processes: bool = False
    framework: str = "keras"
    sync_timeout: float = 120.0
    min_nodes: int | None = None  # sync: continue with this many nodes after the timeout
    baselines: bool = True  # also train standalone nodes and a centralized model
    max_train_examples: int | None = None  # subsample the training set for quick runs
    node_options: dict[str, Any] = field(default_factory=dict)  # extra node kwargs (secret, max_object_bytes...)
    extra: dict[str, Any] = field(default_factory=dict)  # room for worker options (staleness, slowdown...)

    def validate(self) -> None:
        """Fail before any training starts, with a message naming the bad option."""
        if self.num_nodes < 1:
            raise ValueError("num_nodes must be at least 1")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.framework not in WORKERS:
            raise ValueError(f"framework must be one of {', '.join(WORKERS)}, got {self.framework!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"skew must be in [0, 1], got {self.skew}")
        if self.use_processes and self.store_url is not None and self.store_url.startswith("memory://"):
            raise ValueError("memory:// stores live inside one process; use threads or a file:// or s3:// store")

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-safe values, with credentials in options replaced by '***'."""
        data = asdict(self)
        for name in ("storage_options", "node_options"):
            data[name] = {k: ("***" if _looks_secret(k) else v) for k, v in data[name].items()}
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


@dataclass
class NodeResult:
    """One row of the results table."""

    node_id: str
    role: str = "federated"
    test_accuracy: float | None = None
    test_loss: float | None = None
    epochs_completed: int = 0
    wall_time: float = 0.0
    num_train_examples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0
    puts: int = 0
    gets: int = 0
    lists: int = 0
    deletes: int = 0
    federations: int = 0
    peers_used: int = 0
    rejected: int = 0
    error: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SimulationResult:
    """Federated rows, baselines and where the run's objects are."""

    config: SimulationConfig
    run_url: str
    nodes: list[NodeResult]
    standalone: list[NodeResult] = field(default_factory=list)
    centralized: NodeResult | None = None
    wall_time: float = 0.0

    @property
    def ok(self) -> bool:
        rows = [*self.nodes, *self.standalone, *([self.centralized] if self.centralized else [])]
        return all(row.error is None for row in rows)

    @staticmethod
    def _mean(rows: list[NodeResult]) -> float | None:
        values = [r.test_accuracy for r in rows if r.test_accuracy is not None]
        return float(np.mean(values)) if values else None

    @property
    def federated_mean_accuracy(self) -> float | None:
        return self._mean(self.nodes)

    @property
    def standalone_mean_accuracy(self) -> float | None:
        return self._mean(self.standalone)

    @property
    def centralized_accuracy(self) -> float | None:
        return self.centralized.test_accuracy if self.centralized else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.public_dict(),
            "run_url": self.run_url,
            "wall_time": self.wall_time,
            "nodes": [asdict(r) for r in self.nodes],
            "standalone": [asdict(r) for r in self.standalone],
            "centralized": asdict(self.centralized) if self.centralized else None,
            "summary": {
                "federated_mean_accuracy": self.federated_mean_accuracy,
                "standalone_mean_accuracy": self.standalone_mean_accuracy,
                "centralized_accuracy": self.centralized_accuracy,
            },
        }


# -- running tasks ----------------------------------------------------------------
def _train_function(framework: str) -> Callable[[NodeTask, ProgressFn], dict[str, Any]]:
    return importlib.import_module(WORKERS[framework]).train_node


def _error_row(task: NodeTask, exc: BaseException) -> dict[str, Any]:
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return {"node_id": task.name, "role": task.role, "error": detail}


def _run_in_threads(tasks: list[NodeTask], progress: ProgressFn) -> list[dict[str, Any]]:
    """One thread per task in this process (the nodes share the process' TF runtime)."""
    results: list[dict[str, Any] | None] = [None] * len(tasks)

    def run(slot: int, task: NodeTask) -> None:
        try:
            results[slot] = _train_function(task.config.framework)(task, progress)
        except BaseException as exc:  # reported in the row, so one failed node does not hide the others
            results[slot] = _error_row(task, exc)
            progress({"event": "error", "role": task.role, "node": task.name, "error": results[slot]["error"],
                      "traceback": traceback.format_exc()})

    threads = [threading.Thread(target=run, args=(i, t), name=f"sim-{t.name}", daemon=True)
               for i, t in enumerate(tasks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r if r is not None else {"node_id": t.name, "role": t.role, "error": "no result"}
            for r, t in zip(results, tasks)]


def _process_main(task: NodeTask, messages: Any) -> None:
    """Entry point of a spawned worker: train, report progress and the result through ``messages``."""
    try:
        row = _train_function(task.config.framework)(task, lambda event: messages.put(("progress", event)))
    except BaseException as exc:
        messages.put(("progress", {"event": "error", "role": task.role, "node": task.name,
                                   "error": _error_row(task, exc)["error"], "traceback": traceback.format_exc()}))
        row = _error_row(task, exc)
    messages.put(("result", task.index, row))


def _run_in_processes(tasks: list[NodeTask], progress: ProgressFn) -> list[dict[str, Any]]:
    """One spawned process per task (separate TF runtimes, as on separate machines)."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    processes = {t.index: context.Process(target=_process_main, args=(t, messages), name=f"sim-{t.name}")
                 for t in tasks}
    for process in processes.values():
        process.start()
    results: dict[int, dict[str, Any]] = {}
    dead_since: dict[int, float] = {}
    try:
        while len(results) < len(tasks):
            try:
                message = messages.get(timeout=0.5)
            except queue.Empty:
                now = time.monotonic()
                for task in tasks:
                    process = processes[task.index]
                    if task.index in results or process.is_alive():
                        continue
                    # Give the queue a moment to deliver a result written just before exit.
                    if now - dead_since.setdefault(task.index, now) > 3.0:
                        results[task.index] = {"node_id": task.name, "role": task.role,
                                               "error": f"worker process exited with code {process.exitcode}"}
                continue
            if message[0] == "progress":
                progress(message[1])
            elif message[0] == "result":
                results[message[1]] = message[2]
    finally:
        for process in processes.values():
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
    return [results[t.index] for t in tasks]


def _run_tasks(tasks: list[NodeTask], config: SimulationConfig, progress: ProgressFn) -> list[dict[str, Any]]:
    if not tasks:
        return []
    if config.use_processes:
        return _run_in_processes(tasks, progress)
    return _run_in_threads(tasks, progress)


# -- the simulation ------------------------------------------------------------------
def make_run_url(base: str) -> str:
    """A fresh sub-prefix per run, so a re-run never sees the nodes of an earlier one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{base.rstrip('/')}/run-{stamp}-{secrets.token_hex(3)}"


def default_store_url() -> str:
    """A new local folder under the temp dir (what the CLI uses without ``--store``)."""
    return tempfile.mkdtemp(prefix="flwr-serverless-sim-")


def _training_indices(config: SimulationConfig, num_train: int) -> np.ndarray:
    indices = np.arange(num_train)
    if config.max_train_examples is not None and config.max_train_examples < num_train:
        rng = np.random.default_rng(config.seed)
        indices = np.sort(rng.choice(num_train, size=config.max_train_examples, replace=False))
    return indices


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
    parts = [pool[p] for p in partition_label_skew(y_train[pool], config.num_nodes, config.skew, config.seed)]
    empty = [f"node-{i}" for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"{', '.join(empty)} would get no training data; use fewer nodes or a lower skew")

    base_url = config.store_url if config.store_url is not None else default_store_url()
    run_url = make_run_url(base_url)
    federated = [NodeTask("federated", i, f"node-{i}", part, config, run_url) for i, part in enumerate(parts)]
    report({"event": "phase", "phase": "federated", "run_url": run_url, "num_nodes": config.num_nodes,
            "partition_sizes": [len(p) for p in parts]})
    nodes = [NodeResult.from_dict(row) for row in _run_tasks(federated, config, report)]

    standalone: list[NodeResult] = []
    centralized: NodeResult | None = None
    if config.baselines:
        baseline_tasks = [NodeTask("standalone", i, f"node-{i}", part, config) for i, part in enumerate(parts)]
        baseline_tasks.append(NodeTask("centralized", len(parts), "centralized", pool, config))
        report({"event": "phase", "phase": "baselines"})
        rows = [NodeResult.from_dict(row) for row in _run_tasks(baseline_tasks, config, report)]
        standalone, centralized = rows[:-1], rows[-1]

    result = SimulationResult(config=config, run_url=run_url, nodes=nodes, standalone=standalone,
                              centralized=centralized, wall_time=time.monotonic() - started)
    report({"event": "phase", "phase": "done"})
    return result
