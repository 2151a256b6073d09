"""The plain PyTorch helper: ``federate(node, module, ...)`` once per epoch in a hand-written loop."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from fakes import RecordingNode  # noqa: E402

from flwr_serverless.nodes import SyncFederatedNode  # noqa: E402
from flwr_serverless.stores import open_store  # noqa: E402
from flwr_serverless.torch import TorchFederation, federate  # noqa: E402


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _train_epoch(model: torch.nn.Module, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def test_two_loops_federate_in_sync_and_end_identical() -> None:
    url = f"memory://torch-sync-{uuid.uuid4().hex[:8]}"
    models = {"a": _net(0), "b": _net(1)}
    returned: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def loop(name: str, seed: int) -> None:
        try:
            node = SyncFederatedNode(open_store(url), num_nodes=2, timeout=60, node_id=name)
            model = models[name]
            for epoch in range(3):
                loss = _train_epoch(model, seed + 10 * epoch)
                figures = federate(
                    node,
                    model,
                    num_examples=32,
                    metrics={"loss": loss},
                    epoch=epoch,
                    evaluate=lambda m: {"weight_norm": float(sum(p.norm() for p in m.parameters()))},
                )
                returned[name].append(figures)
            node.leave()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(n, s)) for n, s in (("a", 0), ("b", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    a, b = models["a"].state_dict(), models["b"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # float buffers (BatchNorm statistics) included
    assert a["1.num_batches_tracked"] == 3  # integer buffers stay local
    assert len(returned["a"]) == 3 and all({"loss_fed", "weight_norm_fed"} <= set(f) for f in returned["a"])
    assert returned["a"][-1]["loss_fed"] == returned["b"][-1]["loss_fed"]  # the peers' mean: same on both
    assert returned["a"][-1]["weight_norm_fed"] == pytest.approx(float(sum(p.norm() for p in models["a"].parameters())))


def test_one_federation_per_node_and_module_and_what_travels() -> None:
    node = RecordingNode(shift=1.0, metrics={"loss": 0.5})
    model = _net(0)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    figures = federate(node, model, num_examples=10, metrics={"loss": 0.7}, num_steps=4, trainable_only=True)
    assert figures == {"loss_fed": 0.5}
    call = node.calls[0]
    assert call["tensor_names"] == ["0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert call["num_examples"] == 10 and call["num_steps"] == 4 and call["metrics"] == {"loss": 0.7}
    assert torch.equal(model[0].weight, frozen)  # never sent, never written
    assert np.allclose(model[3].bias.detach().numpy(), call["weights"][-1] + 1.0)
    federate(node, model, num_examples=10, trainable_only=True)  # the same TorchFederation, same options
    assert node.calls[1]["tensor_names"] == call["tensor_names"]
    with pytest.raises(ValueError, match="trainable_only changed"):
        federate(node, model, num_examples=10)
    figures = federate(node, model, num_examples=10, trainable_only=True, evaluate=lambda m: {"acc": 0.25})
    assert figures == {"loss_fed": 0.5, "acc_fed": 0.25}  # a new evaluate is taken


def test_bad_arguments_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="num_examples"):
        federate(RecordingNode(), _net(0), num_examples=0)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        TorchFederation(RecordingNode(), object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="federated node"):
        TorchFederation(object(), _net(0))
    frozen = _net(0).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        federate(RecordingNode(), frozen, num_examples=1, trainable_only=True)


_GLOO_WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from flwr_serverless.nodes import SyncFederatedNode
    from flwr_serverless.stores import open_store
    from flwr_serverless.torch import federate

    def main(rank, root, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.manual_seed(rank)  # different weights on each rank before federating
        model = torch.nn.Linear(3, 2)
        # Rank 1's node points at its own folder: if it talked to a store, files would appear there.
        node = SyncFederatedNode(open_store(os.path.join(root, f"store{rank}")), num_nodes=1, node_id=f"r{rank}")
        figures = federate(node, model, num_examples=5, metrics={"loss": float(rank + 1)})
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        if rank == 1:
            assert torch.equal(gathered[0], gathered[1]), "ranks differ after federating"
            assert figures == {"loss_fed": 1.0}, figures  # rank 0's node's figures
        dist.destroy_process_group()

    if __name__ == "__main__":
        import torch.multiprocessing as mp
        mp.spawn(main, args=(sys.argv[1], int(sys.argv[2])), nprocs=2, join=True)
    """
)


@pytest.mark.slow  # two processes importing torch: ~10-30 s on 2 cores
def test_gloo_only_rank_zero_talks_to_the_store(tmp_path: Path) -> None:
    from s3_servers import free_port

    script = tmp_path / "worker.py"
    script.write_text(_GLOO_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(free_port())],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert any((tmp_path / "store0").rglob("*"))  # rank 0 published
    assert not (tmp_path / "store1").exists() or not any((tmp_path / "store1").rglob("*"))  # rank 1 never did
