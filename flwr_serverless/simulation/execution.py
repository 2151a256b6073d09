"""Run simulation tasks concurrently: threads in this process, or spawned processes (one per task).

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


def run_tasks(tasks: list[NodeTask], use_processes: bool, progress: ProgressFn) -> list[dict[str, Any]]:
    """Train ``tasks`` concurrently; one plain-dict row per task, in order (errors become rows)."""
    if not tasks:
        return []
    if use_processes:
        return _run_in_processes(tasks, progress)
    return _run_in_threads(tasks, progress)
