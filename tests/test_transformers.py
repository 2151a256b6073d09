"""The Hugging Face Trainer callback: sync parity, async, LoRA adapters only, steps, main process only, S3."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from fakes import RecordingNode  # noqa: E402
from transformers import (  # noqa: E402
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from flwr_serverless.callbacks.transformers import STATE_FILE  # noqa: E402
from flwr_serverless.nodes import AsyncFederatedNode, SyncFederatedNode  # noqa: E402
from flwr_serverless.stores import open_store  # noqa: E402
from flwr_serverless.transformers import FlwrFederatedCallback  # noqa: E402
from tests.threads import run_in_threads  # noqa: E402

VOCAB = 64


class Tokens(torch.utils.data.Dataset):
    """Random token rows: a language-model batch is {"input_ids", "labels"}."""

    def __init__(self, seed: int, rows: int = 24, length: int = 16) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (rows, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_gpt(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return GPTNeoXForCausalLM(config).to(dtype)


class LogRecorder(TrainerCallback):
    """Stands for a ``report_to`` logger: it sees what the callback handler's on_log hands to every logger."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        self.logs.append(dict(logs or {}))


def _args(tmp: Path, name: str, seed: int, epochs: int = 2, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(
        output_dir=str(tmp / name),
        per_device_train_batch_size=4,
        num_train_epochs=epochs,
        learning_rate=5e-3,
        report_to=[],
        logging_steps=2,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def _in_threads(jobs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run each job in its own thread (two nodes federating together); a failure fails the test."""
    return dict(zip(jobs, run_in_threads(*jobs.values())))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _train_pair(tmp: Path, make_node: Callable[[str], Any], **callback_options: Any) -> dict[str, Any]:
    def job(name: str, seed: int) -> Any:
        model, recorder = tiny_gpt(seed), LogRecorder()
        callback = FlwrFederatedCallback(make_node(name), **callback_options)
        trainer = Trainer(
            model=model,
            args=_args(tmp, name, seed),
            train_dataset=Tokens(seed),
            eval_dataset=Tokens(99, rows=8),
            callbacks=[recorder, callback],
        )
        trainer.train()
        return model, trainer, recorder, callback

    return _in_threads({"a": lambda: job("a", 0), "b": lambda: job("b", 1)})


def test_two_trainers_federate_in_sync_and_end_bit_identical(tmp_path: Path) -> None:
    url = f"memory://hf-sync-{uuid.uuid4().hex[:8]}"
    out = _train_pair(tmp_path, lambda name: SyncFederatedNode(open_store(url), num_nodes=2, timeout=60, node_id=name))
    (model_a, trainer_a, recorder_a, callback_a), (model_b, trainer_b, _, _) = out["a"], out["b"]
    assert _same(model_a, model_b)
    assert not _same(model_a, tiny_gpt(0))  # it trained
    fed = [entry for entry in trainer_a.state.log_history if "loss_fed" in entry]
    assert [entry["epoch"] for entry in fed] == [1.0, 2.0]  # one federation per epoch, logged with its step
    assert all({"eval_loss_fed", "step"} <= set(entry) for entry in fed)
    assert all(np.isfinite(entry["loss_fed"]) for entry in fed)
    # The same figures reached the callback handler's on_log, which is how report_to loggers get them.
    assert [e["eval_loss_fed"] for e in recorder_a.logs if "eval_loss_fed" in e] == [e["eval_loss_fed"] for e in fed]
    # Both trainers evaluated the same federated model on the same data: same figure, bit for bit.
    assert fed[-1]["eval_loss_fed"] == [e for e in trainer_b.state.log_history if "loss_fed" in e][-1]["eval_loss_fed"]
    assert callback_a.last_evaluation["eval_loss"] == fed[-1]["eval_loss_fed"]


def test_async_trainers_federate_every_epoch(tmp_path: Path) -> None:
    url = f"memory://hf-async-{uuid.uuid4().hex[:8]}"
    nodes: dict[str, AsyncFederatedNode] = {}

    def make(name: str) -> AsyncFederatedNode:
        nodes[name] = AsyncFederatedNode(open_store(url), node_id=name)
        return nodes[name]

    out = _train_pair(tmp_path, make)
    for name, (_, trainer, _, _) in out.items():
        assert len([e for e in trainer.state.log_history if "loss_fed" in e]) == 2
        assert nodes[name].stats.federations == 2
    # The later node of the last round saw the other's object: some aggregation used a peer.
    assert sum(node.stats.peers_used for node in nodes.values()) >= 1
    assert sorted(open_store(url).list("nodes/")) == ["nodes/a", "nodes/b"]


def test_federate_every_steps_counts_steps_and_examples_and_flushes_at_the_end(tmp_path: Path) -> None:
    node = RecordingNode(metrics={"loss": 2.0})
    callback = FlwrFederatedCallback(node, federate_every_steps=4)
    trainer = Trainer(
        model=tiny_gpt(0),
        args=_args(tmp_path, "steps", 0, epochs=1),
        train_dataset=Tokens(0, rows=40),
        callbacks=[callback],
    )
    trainer.train()  # 10 steps of 4 rows: federations after steps 4 and 8, the final 2 steps at train end
    assert [c["num_steps"] for c in node.calls] == [4, 4, 2]
    assert [c["num_examples"] for c in node.calls] == [16, 16, 8]
    assert [e["step"] for e in trainer.state.log_history if "loss_fed" in e] == [4, 8, 10]
    names = node.calls[0]["tensor_names"]
    assert "gpt_neox.embed_in.weight" in names and len(set(names)) == len(names)
    assert node.events[-1] == "leave"


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_federate_every_steps_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="federate_every_steps"):
        FlwrFederatedCallback(RecordingNode(), federate_every_steps=bad)


def test_lora_sends_only_adapters_and_never_touches_the_frozen_base(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    url = f"memory://hf-lora-{uuid.uuid4().hex[:8]}"
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_h_to_4h"], lora_dropout=0.0)
    models = {name: peft.get_peft_model(tiny_gpt(0), config) for name in ("a", "b")}
    frozen = {n: p.detach().clone() for n, p in models["a"].named_parameters() if not p.requires_grad}
    full_bytes = sum(p.numel() * p.element_size() for p in models["a"].parameters())

    def job(name: str, seed: int) -> Any:
        node = SyncFederatedNode(open_store(url), num_nodes=2, timeout=60, node_id=name)
        callback = FlwrFederatedCallback(node)
        Trainer(
            model=models[name], args=_args(tmp_path, name, seed), train_dataset=Tokens(seed), callbacks=[callback]
        ).train()
        return callback

    callbacks = _in_threads({"a": lambda: job("a", 0), "b": lambda: job("b", 1)})
    names = callbacks["a"].tensors.names()
    assert names and all("lora_" in n for n in names)
    store = open_store(url)
    sizes = [info.size for key, info in store.list("").items() if key.rsplit("/", 1)[-1] == "a"]
    assert sizes and max(sizes) < full_bytes / 5  # a node's object: the adapters, not the model
    after = dict(models["a"].named_parameters())
    assert all(torch.equal(after[n], before) for n, before in frozen.items())  # frozen base bit-identical
    adapters = {n: p for n, p in models["a"].named_parameters() if p.requires_grad}
    other = dict(models["b"].named_parameters())
    assert all(torch.equal(p, other[n]) for n, p in adapters.items())  # adapters federated to the same bits
    assert any(not torch.equal(p, 0 * p) for n, p in adapters.items() if "lora_B" in n)  # and they trained


def test_trainable_only_for_a_plain_module() -> None:
    model = tiny_gpt(0)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("gpt_neox.final_layer_norm")
    node = RecordingNode()
    callback = FlwrFederatedCallback(node, trainable_only=True)
    callback.on_train_begin(_args(Path("/tmp"), "x", 0), _state(), None, model=model)
    assert callback.tensors is not None and callback.tensors.names() == [
        "gpt_neox.final_layer_norm.weight",
        "gpt_neox.final_layer_norm.bias",
    ]


def _state() -> Any:
    from transformers import TrainerState

    return TrainerState()


class _TwoRanks:
    """A fake 2-process group: ``broadcast`` hands rank 0's object to rank 1 (a barrier on each side)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=60)
        self.box: Any = None

    def broadcast(self, rank: int, obj: Any) -> Any:
        if rank == 0:
            self.box = obj
        self.barrier.wait()
        got = self.box
        self.barrier.wait()
        return got


class _NeverCalled(RecordingNode):
    def update_parameters(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a non-main process talked to the store")

    def leave(self) -> None:
        raise AssertionError("a non-main process left the federation")


def test_only_the_main_process_talks_to_the_store_and_every_rank_gets_the_result(tmp_path: Path) -> None:
    group = _TwoRanks()

    class RankCallback(FlwrFederatedCallback):
        rank = 0

        def _world(self) -> tuple[bool, int, Callable[[Any], Any]]:
            return self.rank == 0, 2, lambda obj: group.broadcast(self.rank, obj)

    main_node = RecordingNode(shift=0.5, metrics={"loss": 1.0})

    def job(rank: int) -> Any:
        callback = RankCallback(main_node if rank == 0 else _NeverCalled())
        callback.rank = rank
        model = tiny_gpt(0)
        trainer = Trainer(
            model=model, args=_args(tmp_path, f"r{rank}", rank), train_dataset=Tokens(rank), callbacks=[callback]
        )
        trainer.train()
        return model, trainer

    out = _in_threads({"0": lambda: job(0), "1": lambda: job(1)})
    (model0, _), (model1, trainer1) = out["0"], out["1"]
    assert len(main_node.calls) == 2 and main_node.events[-1] == "leave"
    assert _same(model0, model1)  # rank 1 loaded what rank 0's node returned (different data, same weights)
    assert [e["loss_fed"] for e in trainer1.state.log_history if "loss_fed" in e] == [1.0, 1.0]


def test_a_failure_on_the_main_process_reaches_every_rank() -> None:
    from flwr_serverless.callbacks.torch_state import broadcast_from_main

    group = _TwoRanks()
    seen: list[BaseException] = []

    def rank(r: int) -> None:
        def exchange() -> Any:
            raise OSError("store down")

        try:
            broadcast_from_main(exchange, r == 0, lambda obj: group.broadcast(r, obj))
        except BaseException as exc:
            seen.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(type(e).__name__ for e in seen) == ["OSError", "RuntimeError"]
    assert any("store down" in str(e) for e in seen)


def test_checkpoints_carry_the_node_state_and_resume_reads_it(tmp_path: Path) -> None:
    node = RecordingNode(node_id="node-7")
    node.state = {"node_id": "node-7", "federations": 3}
    Trainer(
        model=tiny_gpt(0),
        args=_args(tmp_path, "ckpt", 0, epochs=1, save_strategy="epoch"),
        train_dataset=Tokens(0, rows=8),
        callbacks=[FlwrFederatedCallback(node)],
    ).train()
    saved = tmp_path / "ckpt" / "checkpoint-2" / STATE_FILE
    assert saved.exists() and "node-7" in saved.read_text()

    fresh = RecordingNode(node_id="other")
    Trainer(
        model=tiny_gpt(0),
        args=_args(tmp_path, "ckpt", 0, epochs=2, save_strategy="no"),
        train_dataset=Tokens(0, rows=8),
        callbacks=[FlwrFederatedCallback(fresh)],
    ).train(resume_from_checkpoint=str(saved.parent))
    assert fresh.state["node_id"] == "node-7" and fresh.state["federations"] == 3


def test_sync_trainers_through_s3(tmp_path: Path, moto_endpoint: str, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/hf-{uuid.uuid4().hex[:8]}"

    def make(name: str) -> SyncFederatedNode:
        return SyncFederatedNode(open_store(url, endpoint_url=moto_endpoint), num_nodes=2, timeout=60, node_id=name)

    out = _train_pair(tmp_path, make, evaluate_federated_model=False)
    assert _same(out["a"][0], out["b"][0])
    assert not any("eval_loss_fed" in e for e in out["a"][1].state.log_history)


def test_sharded_training_is_refused_by_name() -> None:
    from types import SimpleNamespace

    from flwr_serverless.callbacks.transformers import _refuse_sharded

    def trainer(fsdp: bool, zero_stage: int | None) -> Any:
        plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
        state = SimpleNamespace(deepspeed_plugin=plugin)
        return SimpleNamespace(
            accelerator=SimpleNamespace(state=state), is_deepspeed_enabled=plugin is not None, is_fsdp_enabled=fsdp
        )

    _refuse_sharded(trainer(False, None))
    _refuse_sharded(trainer(False, 2))
    for fsdp, stage in ((True, None), (False, 3)):
        with pytest.raises(ValueError, match="FSDP and ZeRO-3"):
            _refuse_sharded(trainer(fsdp, stage))


_DDP_WORKER = """
import json, os, sys

def main(rank, root, port):
    os.environ.update(HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments
    from fakes import RecordingNode
    from flwr_serverless.transformers import FlwrFederatedCallback

    class Rows(torch.utils.data.Dataset):
        ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))
        def __len__(self): return len(self.ids)
        def __getitem__(self, i): return {"input_ids": self.ids[i], "labels": self.ids[i]}

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=16)
    model = GPTNeoXForCausalLM(config)
    node = RecordingNode(shift=0.5, metrics={"loss": 1.0}, node_id=f"r{rank}")  # shifts what it returns
    args = TrainingArguments(os.path.join(root, "out"), num_train_epochs=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1,
                             ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[FlwrFederatedCallback(node)])
    trainer.train()
    total = float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().sum())
    out = {"events": node.events, "examples": [c["num_examples"] for c in node.calls], "sum": total,
           "world": args.world_size, "fed": [e["loss_fed"] for e in trainer.state.log_history if "loss_fed" in e]}
    with open(os.path.join(root, f"rank{rank}.json"), "w") as handle:
        json.dump(out, handle)

if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(main, args=(sys.argv[1], int(sys.argv[2])), nprocs=2, join=True)
"""


@pytest.mark.slow  # two processes importing transformers: ~30-60 s on 2 cores
def test_real_ddp_only_rank_zero_federates_and_every_rank_loads_the_result(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from s3_servers import free_port

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    tests, root = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(tests), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(script), str(tmp_path), str(free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["events"] == ["update", "update", "leave"] and rank1["events"] == []
    assert rank0["examples"] == [16, 16]  # 2 steps x 4 rows x 2 processes per epoch
    # Rank 1 carries the node's +0.5 shifts it never computed: it loaded rank 0's broadcast.
    assert rank0["sum"] == rank1["sum"]
    assert rank0["fed"] == rank1["fed"] == [1.0, 1.0]
