"""The 0.2.0 module of semi-sync: the node is in ``flwr_serverless.node`` (here with 0.2.0's argument order,
see ``flwr_serverless.nodes``), the plan in ``modes.semisync``."""

from flwr_serverless.modes.semisync import plan_budgets
from flwr_serverless.nodes import SemiSyncFederatedNode
from flwr_serverless.wire.layout import PROFILES as PROFILES_PREFIX

__all__ = ["PROFILES_PREFIX", "SemiSyncFederatedNode", "plan_budgets"]
