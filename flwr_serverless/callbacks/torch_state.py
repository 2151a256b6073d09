"""Which tensors of a torch module travel, and how they become numpy arrays and back.

Shared by the Transformers callback and the plain PyTorch helper (both import torch;
``import flwr_serverless`` never does). Names are state-dict keys, so they are the
same on every node that builds the same model (PEFT adapters included). bfloat16
tensors travel as their raw bits (``wire.dtypes.BF16``), float16 as float16: no
upcast on the wire, and each tensor comes back in its own dtype and device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from flwr_serverless.wire.dtypes import BF16, is_bf16

__all__ = [
    "TorchTensors",
    "broadcast_from_main",
    "is_peft_model",
    "native_bf16",
    "on_main_process",
    "to_numpy",
    "to_torch",
]

T = TypeVar("T")


def is_peft_model(module: Any) -> bool:
    """A PEFT model (LoRA, ...): it carries a ``peft_config``; detected without importing peft."""
    return isinstance(getattr(module, "peft_config", None), dict)


def native_bf16(node: Any) -> bool:
    """Whether ``node`` averages ``BF16`` tensors itself. Two paths do arithmetic of their own that does
    not know the bits type yet: the aggregate mode (its running mean) and FedAsync mixing (``alpha``); for
    those, bfloat16 travels widened to float32 (exact) and is rounded back on load, as before."""
    from flwr_serverless.node.aggregate_node import AggregateFederatedNode

    if isinstance(node, AggregateFederatedNode):
        return False
    return getattr(getattr(node, "policy", None), "alpha", None) is None


def to_numpy(tensor: torch.Tensor, bf16_bits: bool = True) -> np.ndarray:
    """A CPU copy of ``tensor`` as numpy, bfloat16 as ``BF16`` bits (numpy has no bfloat16), or widened to
    float32 when not ``bf16_bits``."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        if not bf16_bits:
            return tensor.float().cpu().numpy()
        return tensor.view(torch.int16).cpu().numpy().copy().view(BF16)
    return tensor.cpu().numpy().copy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    """The inverse of ``to_numpy`` (a CPU tensor sharing ``array``'s memory when it is writable)."""
    array = np.require(array, requirements=["C", "W"])  # copies read-only views only
    if is_bf16(array.dtype):
        return torch.from_numpy(array.view("<i2")).view(torch.bfloat16)
    return torch.from_numpy(array)


class TorchTensors:
    """The federated tensors of ``module``: all float parameters (plus float buffers when
    ``include_buffers``), or only those with ``requires_grad`` when ``trainable_only``.

    ``trainable_only=None`` picks it for PEFT models: only the adapters travel and are
    aggregated; frozen weights never leave the node and are never written.
    Tied weights travel once (under the name ``named_parameters`` gives them).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        include_buffers: bool = True,
        trainable_only: bool | None = None,
        bf16_bits: bool = True,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.bf16_bits = bf16_bits  # False: bfloat16 travels as float32 (see ``native_bf16``)
        self.include_buffers = bool(include_buffers)
        self.trainable_only = is_peft_model(module) if trainable_only is None else bool(trainable_only)
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        """State-dict keys that travel, in state-dict order (fixed at the first call)."""
        if self._names is None:
            self._names = self._select()
            if not self._names:
                what = "trainable parameters (requires_grad)" if self.trainable_only else "float tensors"
                raise ValueError(f"{type(self.module).__name__} has no {what} to federate")
        return self._names

    def _select(self) -> list[str]:
        params = dict(self.module.named_parameters())  # tied weights appear once
        every = dict(self.module.named_parameters(remove_duplicate=False))
        names = []
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if not torch.is_floating_point(tensor):
                continue  # step counters and the like stay local
            if name in params:
                if params[name].requires_grad or not self.trainable_only:
                    names.append(name)
            elif name not in every and self.include_buffers and not self.trainable_only:
                names.append(name)
        return names

    def _tensors(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict(keep_vars=True)

    def get_arrays(self) -> list[np.ndarray]:
        tensors = self._tensors()
        return [to_numpy(tensors[name], self.bf16_bits) for name in self.names()]

    def set_arrays(self, arrays: list[np.ndarray]) -> None:
        tensors, names = self._tensors(), self.names()
        if len(arrays) != len(names):
            raise ValueError(f"got {len(arrays)} arrays for {len(names)} federated tensors")
        with torch.no_grad():
            for name, array in zip(names, arrays):
                # copy_ keeps the tensor's dtype (float32 rounds back to bf16), device and identity
                tensors[name].copy_(to_torch(array))

    def nbytes(self) -> int:
        """Bytes of the federated tensors (what one node publishes, before framing)."""
        tensors = self._tensors()
        return sum(tensors[n].numel() * tensors[n].element_size() for n in self.names())

    def named_trainables(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]


def on_main_process(exchange: Callable[[], T]) -> T:
    """Run ``exchange`` on global rank 0 only and give its result to every rank (``torch.distributed``
    when a process group is up; a single process just runs it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return exchange()
    return broadcast_from_main(exchange, dist.get_rank() == 0, _broadcast_object)


def broadcast_from_main(exchange: Callable[[], T], is_main: bool, broadcast: Callable[[Any], Any]) -> T:
    """``exchange()`` on the main process, its result (or its failure) on every rank through ``broadcast``:
    a failure on the main process raises everywhere instead of leaving the other ranks waiting."""
    box: Any = None
    if is_main:
        try:
            box = ("ok", exchange())
        except Exception as exc:  # every rank must learn it, or they would wait for a result forever
            box = ("error", f"{type(exc).__name__}: {exc}")
            broadcast(box)
            raise
    box = broadcast(box)
    if box[0] == "error":
        raise RuntimeError(f"federation failed on the main process: {box[1]}")
    return box[1]


def _broadcast_object(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
