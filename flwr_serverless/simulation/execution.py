"""Run simulation tasks concurrently: threads in this process, a bounded pool of spawned processes
(each hosting several nodes in threads), (the runner sends tasks to a Ray cluster through ``ray_engine`` instead).

Workers return plain dicts, so processes never pickle models; a failed task
becomes a row with an ``error``, so one failed node does not hide the others.
"""

from __future__ import annotations

import importlib
import multiprocessing
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import NodeTask

ProgressFn = Callable[[dict[str, Any]], None]

#: framework name -> module exposing ``train_node(task, progress) -> dict``
WORKERS: dict[str, str] = {
    "keras": "flwr_serverless.simulation.keras_worker",
    "lightning": "flwr_serverless.simulation.lightning_worker",
}
#: default cap on worker processes: 100 processes each importing TensorFlow (~0.7 GB) would not fit in 24 GB
DEFAULT_MAX_PROCESSES = 8


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
            progress(
                {
                    "event": "error",
                    "role": task.role,
                    "node": task.name,
                    "error": results[slot]["error"],
                    "traceback": traceback.format_exc(),
                }
            )

    threads = [
        threading.Thread(target=run, args=(i, t), name=f"sim-{t.name}", daemon=True) for i, t in enumerate(tasks)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [
        r if r is not None else {"node_id": t.name, "role": t.role, "error": "no result"}
        for r, t in zip(results, tasks)
    ]


def _process_main(tasks: list[NodeTask], messages: Any) -> None:
    """Entry point of a spawned worker: its nodes in threads, progress and each result through ``messages``."""
    rows = _run_in_threads(tasks, lambda event: messages.put(("progress", event)))
    for task, row in zip(tasks, rows):
        messages.put(("result", task.index, row))


def pool_size(num_tasks: int, workers: int | None) -> int:
    """Worker processes for ``num_tasks`` nodes: ``workers`` if given, else one per node up to
    ``DEFAULT_MAX_PROCESSES`` (each process imports the framework: ~0.7 GB with TensorFlow).
    """
    return max(1, min(num_tasks, workers if workers is not None else DEFAULT_MAX_PROCESSES))


def _run_in_processes(tasks: list[NodeTask], progress: ProgressFn, workers: int | None) -> list[dict[str, Any]]:
    """Spawned processes (separate runtimes, as on separate machines), each hosting its share of the
    nodes in threads; every node runs at once, so sync barriers are met whatever the pool size.
    """
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    size = pool_size(len(tasks), workers)
    shares = [tasks[i::size] for i in range(size)]
    processes = [
        context.Process(target=_process_main, args=(share, messages), name=f"sim-worker-{i}")
        for i, share in enumerate(shares)
    ]
    for process in processes:
        process.start()
    results: dict[int, dict[str, Any]] = {}
    dead_since: dict[int, float] = {}
    try:
        while len(results) < len(tasks):
            try:
                message = messages.get(timeout=0.5)
            except queue.Empty:
                now = time.monotonic()
                for slot, (process, share) in enumerate(zip(processes, shares)):
                    missing = [t for t in share if t.index not in results]
                    if not missing or process.is_alive():
                        continue
                    # Give the queue a moment to deliver results written just before exit.
                    if now - dead_since.setdefault(slot, now) > 3.0:
                        for task in missing:
                            results[task.index] = {
                                "node_id": task.name,
                                "role": task.role,
                                "error": f"worker process exited with code {process.exitcode}",
                            }
                continue
            if message[0] == "progress":
                progress(message[1])
            elif message[0] == "result":
                results[message[1]] = message[2]
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
    return [results[t.index] for t in tasks]


def run_locally(tasks: list[NodeTask], use_processes: bool, progress: ProgressFn) -> list[dict[str, Any]]:
    """Train ``tasks`` concurrently on this machine; one plain-dict row per task, in order (errors become rows)."""
    if not tasks:
        return []
    if use_processes:
        return _run_in_processes(tasks, progress, tasks[0].config.workers)
    return _run_in_threads(tasks, progress)
