"""Run a simulation's nodes as Ray tasks, so hundreds of nodes use the cluster one already has.

Each Ray task hosts one node (or, with ``workers=K``, one of K groups of nodes
in threads) and calls the same worker function as the local engine
(``keras_worker.train_node`` / ``lightning_worker.train_node``) with the
plain-data ``NodeTask``. Nodes federate through the store, which therefore
must be a URL every worker reaches: ``s3://...`` on a real cluster, ``file://``
on a one-machine Ray. Progress events travel through a Ray queue; results come
back as plain dicts (never models). Ray is optional: ``pip install
flwr-serverless[ray]``; the workers need flwr-serverless and the framework too.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from flwr_serverless.simulation.execution import ProgressFn, _error_row, _run_in_threads
from flwr_serverless.simulation.options import NON_WAITING_MODES

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import NodeTask

#: how long the driver waits for a result before draining progress events again (seconds)
POLL_SECONDS = 0.5


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError("--engine ray needs Ray: pip install 'flwr-serverless[ray]'") from None
    return ray


def _host_nodes(tasks: list[NodeTask], events: Any) -> list[dict[str, Any]]:
    """Body of one Ray task: its nodes in threads, progress into the Ray queue (never blocking training)."""

    def progress(event: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # a full or gone queue drops a progress line, never a node
            events.put_nowait(event)

    return _run_in_threads(tasks, progress)


def _groups(tasks: list[NodeTask], workers: int | None) -> list[list[NodeTask]]:
    size = max(1, min(len(tasks), workers if workers is not None else len(tasks)))
    return [tasks[i::size] for i in range(size)]


def _check_capacity(ray: Any, tasks: list[NodeTask], groups: int) -> None:
    """Sync and semi-sync nodes wait for each other: all of them must be placed at once, or the barrier times out."""
    config = tasks[0].config
    if config.mode in NON_WAITING_MODES or tasks[0].role != "federated":
        return
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < groups:
        raise RuntimeError(
            f"--mode {config.mode} needs all {groups} Ray tasks running at once but the cluster has "
            f"{cpus:g} CPUs; use --workers {int(cpus) or 1} (nodes share a task in threads) or a "
            "bigger cluster"
        )


def run_on_ray(tasks: list[NodeTask], progress: ProgressFn) -> list[dict[str, Any]]:
    """Train ``tasks`` as Ray tasks; one plain-dict row per task, in order (a failed Ray task becomes error rows).

    Joins ``config.ray_address`` (or RAY_ADDRESS, else starts a local Ray) unless Ray is already initialized,
    in which case that session is used and left running.
    """
    ray = _import_ray()
    from ray.util.queue import Queue

    config = tasks[0].config
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=config.ray_address, log_to_driver=False)
    try:
        groups = _groups(tasks, config.workers)
        _check_capacity(ray, tasks, len(groups))
        events = Queue(maxsize=10_000)
        remote = ray.remote(num_cpus=1, max_retries=0)(_host_nodes)
        pending = {remote.remote(group, events): group for group in groups}
        results: dict[int, dict[str, Any]] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            _drain(events, progress)
            for ref in done:
                group = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except Exception as exc:  # the worker died or could not import: say so on each of its nodes
                    rows = [_error_row(task, exc) for task in group]
                    for task, row in zip(group, rows):
                        progress({"event": "error", "role": task.role, "node": task.name, "error": row["error"]})
                results.update((task.index, row) for task, row in zip(group, rows))
        _drain(events, progress)
        events.shutdown()
        return [results[t.index] for t in tasks]
    finally:
        if started_here:
            ray.shutdown()


def _drain(events: Any, progress: ProgressFn) -> None:
    """Hand the queued progress events to ``progress`` without waiting for more."""
    while True:
        try:
            batch = events.get_nowait_batch(min(events.qsize(), 1000))
        except Exception:  # ray.util.queue.Empty, or a queue already gone
            return
        if not batch:
            return
        for event in batch:
            progress(event)
