"""What a framework callback may call on a federated node: the one contract both callbacks are typed against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Federating(Protocol):
    """A node as the Keras and Lightning callbacks see it (implemented by every ``FederatedNode``).

    ``update_parameters`` publishes the local weights, federates and returns (weights, metrics) in the
    type given. ``steps_until_federation`` is ``None`` when the node federates at epoch end, else the
    number of batches after which it wants to federate (semi-sync). ``record_batch_time`` feeds its
    planning. ``leave`` ends the node's membership (called once training is over, after a last
    ``update_parameters`` with any work not yet federated); it never raises on store faults.
    """

    node_id: str

    def update_parameters(
        self,
        parameters: Any,
        num_examples: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        *,
        num_steps: int | None = None,
        tensor_names: Sequence[str] | None = None,
        framework: str | None = None,
    ) -> tuple[Any, dict[str, float]]: ...

    def steps_until_federation(self) -> int | None: ...

    def record_batch_time(self, seconds: float, ended_at: float | None = None) -> None: ...

    def leave(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
