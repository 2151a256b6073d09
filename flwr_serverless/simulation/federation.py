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
    """The federated node of ``task``: async, sync or semi-sync, on a store opened for this run."""
    from flwr_serverless.stores import open_store
    from flwr_serverless.strategies import make_strategy

    config = task.config
    if task.run_url is None:
        raise ValueError(f"{task.name}: a federated task needs a store URL")
    strategy_options = dict(config.strategy_options)
    if strategy_key(config.strategy) == "fedprox":
        # Only for the record: the callback applies mu (see options.PROXIMAL_MU_NOTE).
        strategy_options["proximal_mu"] = config.effective_proximal_mu
    strategy = make_strategy(config.strategy, initial_parameters=initial_weights, **strategy_options)
    _number_rounds_by_aggregation(strategy)
    store = open_store(task.run_url, **config.storage_options)
    common: dict[str, Any] = {"strategy": strategy, "node_id": task.name, **config.node_options}
    if config.mode == "semisync":
        from flwr_serverless.semisync import SemiSyncFederatedNode

        return SemiSyncFederatedNode(store, lambda_=config.semisync.lambda_, reestimate=config.semisync.reestimate,
                                     num_nodes=config.num_nodes, timeout=config.timeout,
                                     min_nodes=config.min_nodes, **common)
    if config.mode == "sync":
        from flwr_serverless.nodes import SyncFederatedNode

        return SyncFederatedNode(store, num_nodes=config.num_nodes, timeout=config.timeout,
                                 min_nodes=config.min_nodes, **common)
    from flwr_serverless.nodes import AsyncFederatedNode

    return AsyncFederatedNode(store, **config.async_options.node_kwargs(config.seed, task.index), **common)


def _number_rounds_by_aggregation(strategy: Any) -> None:
    """Work around a node bug for FedAvgM: rounds are numbered by the strategy's own aggregations.

    A node numbers rounds by its federation calls, and a call without peers (an
    async node's first epoch, a sync round left alone after a timeout) counts
    without reaching the strategy. FedAvgM then asserts in round 2 that its
    momentum was created in round 1. The fix belongs in the node; until then
    the simulation numbers FedAvgM's rounds itself.
    """
    from flwr.server.strategy import FedAvgM

    if not isinstance(strategy, FedAvgM):
        return
    inner = strategy.aggregate_fit
    calls = 0

    def aggregate_fit(server_round: int, results: Any, failures: Any) -> Any:
        nonlocal calls
        calls += 1
        return inner(calls, results, failures)

    strategy.aggregate_fit = aggregate_fit  # an instance attribute: aggregation.py checks the class's method


def callback_kwargs(config: SimulationConfig) -> dict[str, Any]:
    """Keyword arguments of ``FlwrFederatedCallback`` (Keras and Lightning alike)."""
    return {"proximal_mu": config.effective_proximal_mu}
