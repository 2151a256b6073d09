"""Build a simulated node and its callback options from the typed config (shared by every framework's worker).

Nodes are constructed with keyword arguments only, so the mapping from option
to constructor argument is explicit, and tests can check it by swapping the
node classes for recorders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flwr_serverless.simulation.options import strategy_key

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import NodeTask, SimulationConfig


def make_node(task: NodeTask, initial_weights: list[Any]) -> Any:
    """The federated node of ``task``: async, sync, semi-sync or aggregate, on a store opened for this run."""
    from flwr_serverless.stores import open_store
    from flwr_serverless.strategy.factory import make_strategy

    config = task.config
    if task.run_url is None:
        raise ValueError(f"{task.name}: a federated task needs a store URL")
    strategy_options = dict(config.strategy_options)
    if strategy_key(config.strategy) == "fedprox":
        # Only for the record: the callback applies mu (see options.PROXIMAL_MU_NOTE).
        strategy_options["proximal_mu"] = config.effective_proximal_mu
    strategy = make_strategy(config.strategy, initial_parameters=initial_weights, **strategy_options)
    store = open_store(task.run_url, **config.storage_options)
    compression = config.effective_compression
    plain = {k: v for k, v in config.node_options.items() if k not in compression.node_kwargs()}
    # Every node of the run is handed the same run id (its sub-prefix's name), so each reader can tell from the
    # objects alone that a peer belongs to this run; node_options={"run_id": ...} continues another on purpose.
    plain.setdefault("run_id", run_id_of(task.run_url))
    common: dict[str, Any] = {"strategy": strategy, "node_id": task.name, **plain, **compression.node_kwargs()}
    if config.mode == "semisync":
        from flwr_serverless.node import SemiSyncFederatedNode

        return SemiSyncFederatedNode(
            store,
            lambda_=config.semisync.lambda_,
            reestimate=config.semisync.reestimate,
            num_nodes=config.num_nodes,
            timeout=config.timeout,
            min_nodes=config.min_nodes,
            **common,
        )
    if config.mode == "sync":
        from flwr_serverless.node import SyncFederatedNode

        return SyncFederatedNode(
            store, num_nodes=config.num_nodes, timeout=config.timeout, min_nodes=config.min_nodes, **common
        )
    if config.mode == "aggregate":
        from flwr_serverless.node import AggregateFederatedNode

        # The seed makes each node's compare-and-swap backoff jitter reproducible.
        return AggregateFederatedNode(store, seed=config.seed * 7919 + task.index, **common)
    from flwr_serverless.node import AsyncFederatedNode

    return AsyncFederatedNode(store, **config.async_options.node_kwargs(config.seed, task.index), **common)


def run_id_of(run_url: str) -> str:
    """The run id the simulation hands its nodes: the last part of the run's prefix (``run-<time>-<hex>``)."""
    return run_url.rstrip("/").rsplit("/", 1)[-1]


def callback_kwargs(config: SimulationConfig) -> dict[str, Any]:
    """Keyword arguments of ``FlwrFederatedCallback`` (Keras and Lightning alike)."""
    return {"proximal_mu": config.effective_proximal_mu}
