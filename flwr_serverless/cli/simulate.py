"""``flwr-serverless simulate``: its flags and the run; imported only when that command is given.

Importing this module imports the simulation (not a deep-learning framework): ``inspect`` and ``clean``
never pay for it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from flwr_serverless.cli.parsing import key_value, typed
from flwr_serverless.simulation.data import DATASETS
from flwr_serverless.simulation.options import (
    ENGINES,
    PROXIMAL_MU_NOTE,
    AsyncOptions,
    Evaluation,
    Heterogeneity,
    SemiSyncOptions,
    check_mode_flags,
    parse_factors,
    parse_seeds,
)
from flwr_serverless.simulation.partitions import Partitioning
from flwr_serverless.simulation.report import ProgressPrinter, execution_label, format_report, partition_label
from flwr_serverless.simulation.runner import DEFAULT_SKEW, MODES, WORKERS, SimulationConfig
from flwr_serverless.simulation.update_options import CompressionOptions, topk_option_names
from flwr_serverless.strategy.factory import STRATEGY_NAMES
from flwr_serverless.validation import parse_number


def add_simulate_arguments(sim: argparse.ArgumentParser) -> None:
    """Every flag of ``simulate``."""
    sim.add_argument("--nodes", type=int, default=2, help="number of federated nodes (default 2)")
    sim.add_argument(
        "--mode",
        choices=MODES,
        default="async",
        help="async never waits; sync has a barrier per epoch; semisync one per time budget; "
        "aggregate is async FedAvg through one compare-and-swap object (O(1) reads per epoch; "
        "needs --strategy fedavg and a store with conditional writes)",
    )
    sim.add_argument("--strategy", choices=STRATEGY_NAMES, default="fedavg", help="Flower aggregation strategy")
    sim.add_argument(
        "--strategy-option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="Flower strategy argument, e.g. server_momentum=0.9 for fedavgm or eta=0.01 for fedadam "
        "(repeatable); proximal_mu=MU is taken as --proximal-mu MU",
    )
    sim.add_argument(
        "--proximal-mu",
        type=float,
        default=None,
        metavar="MU",
        help="FedProx proximal term, applied by the training callback after every optimizer step "
        "(default 0; 0.01 with --strategy fedprox)",
    )
    sim.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="shared store: s3://bucket/prefix, file:///path, memory://name, ... "
        "(default: a new folder under the temp dir); each run uses a fresh sub-prefix",
    )
    sim.add_argument(
        "--storage-option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="fsspec/S3 storage option, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)",
    )
    sim.add_argument("--epochs", type=int, default=5)
    sim.add_argument("--dataset", choices=DATASETS, default="digits")
    sim.add_argument("--data-dir", default=None, help="folder with the dataset's IDX files (fashion_mnist, mnist)")
    sim.add_argument("--max-train-examples", type=int, default=None, help="subsample the training set")
    sim.add_argument(
        "--skew",
        type=float,
        default=None,
        help=f"label skew in [0, 1] of the paper's split (--partitioner skew); 0 is IID (default {DEFAULT_SKEW})",
    )
    sim.add_argument(
        "--partitioner",
        default="skew",
        metavar="KIND",
        help="how the training set is split: skew (the paper's label skew, the default), or a Flower Datasets "
        "partitioner: iid, dirichlet:ALPHA, pathological:K (K classes per node), shard:K (K shards per node); "
        "needs pip install flwr-datasets",
    )
    sim.add_argument(
        "--partitioner-option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="another argument of the Flower Datasets partitioner, e.g. min_partition_size=20 (dirichlet), "
        "class_assignment_mode=deterministic (pathological), shard_size=50 (shard); repeatable",
    )
    sim.add_argument("--batch-size", type=int, default=32)
    sim.add_argument("--learning-rate", type=float, default=1e-3)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--framework", choices=sorted(WORKERS), default="keras")
    sim.add_argument(
        "--processes",
        action="store_true",
        help="spawned processes instead of threads: one per node, up to --workers (default 8)",
    )
    sim.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="K",
        help="with --processes: K processes host the nodes, in threads (~0.7 GB each with TF)",
    )
    sim.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local (threads or processes here) or ray (nodes as Ray tasks; pip install "
        "flwr-serverless[ray]; needs a --store every worker reaches)",
    )
    sim.add_argument(
        "--address",
        default=None,
        metavar="RAY_ADDRESS",
        help="with --engine ray: the cluster, e.g. ray://head:10001 or auto (default: RAY_ADDRESS, else a local Ray)",
    )
    sim.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="sync and semisync: seconds to wait for the other nodes (default 120)",
    )
    sim.add_argument(
        "--min-nodes", type=int, default=None, help="sync and semisync: continue with this many after the timeout"
    )
    sim.add_argument("--no-baselines", action="store_true", help="skip the standalone and centralized runs")
    sim.add_argument(
        "--baseline-cache",
        default=None,
        metavar="DIR",
        help="train each baseline once per (dataset, seed, partition, epochs, model) and reuse it",
    )
    sim.add_argument(
        "--seeds",
        type=typed(parse_seeds),
        default=None,
        metavar="0-4",
        help="repeat the run for each seed (e.g. 0-4 or 1,3,7) and print mean +- 95%% CI",
    )
    sim.add_argument(
        "--eval-each-epoch",
        action="store_true",
        help="test the federated model after every federation and show it in the live lines",
    )
    sim.add_argument(
        "--eval-examples",
        type=int,
        default=None,
        metavar="N",
        help="with --eval-each-epoch: test on the first N test examples (the final test uses all)",
    )
    sim.add_argument("--json", default=None, metavar="PATH", help="also write the full results as JSON")
    sim.add_argument(
        "--csv",
        default=None,
        metavar="PATH",
        help="also write one row per run as CSV (with the store traffic and node counters summed)",
    )
    sim.add_argument(
        "--nodes-csv",
        default=None,
        metavar="PATH",
        help="also write one row per federated node and run as CSV (traffic and every node counter)",
    )
    sim.add_argument("--quiet", action="store_true", help="no live per-epoch lines")
    het = sim.add_argument_group("staleness, semi-sync and slow nodes (see docs/modes.md)")
    het.add_argument("--staleness", default=None, help="async: staleness function: constant, poly:A, hinge:A,B")
    het.add_argument(
        "--staleness-unit",
        choices=("steps", "versions"),
        default=None,
        help="async: staleness in unseen community steps (FedRec) or updates (FedAsync)",
    )
    het.add_argument("--alpha", type=float, default=None, help="async: FedAsync mixing weight in (0, 1]")
    het.add_argument("--buffer-size", type=int, default=None, help="async: FedBuff, aggregate after K new updates")
    het.add_argument("--participation", type=float, default=None, help="async: probability C of federating")
    het.add_argument(
        "--lambda",
        dest="lambda_",
        type=float,
        default=None,
        help="semisync: round length as a multiple of the slowest node's epoch (default 2)",
    )
    het.add_argument(
        "--no-reestimate",
        action="store_true",
        help="semisync: keep the first round's batch times instead of re-measuring every round",
    )
    het.add_argument(
        "--slowdown",
        type=typed(parse_factors),
        default=None,
        metavar="F0,F1,...",
        help="per-node slowdown factors, e.g. 1,1,4: node 2's batches take 4x as long",
    )
    het.add_argument(
        "--batch-seconds",
        type=float,
        default=None,
        metavar="S",
        help="pad every batch to (its node's factor x S) seconds, so the emulated speeds hold "
        "even when threads compete for cores",
    )
    het.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="S",
        help="stop every node's training after S seconds of wall time",
    )
    _add_compression_flags(sim)


#: ``"5"`` -> 5, ``"0.1"`` -> 0.1: the node checks which it needs and says so naming the flag
_number = typed(parse_number)


def _compression(text: str) -> str:
    from flwr_serverless.wire.compression import parse_compression

    parse_compression(text)  # ValueError naming the value
    return text


#: metavar and help of the top-k flags known today; any other ``topk_*`` node option gets a generic flag
_TOPK_FLAGS: dict[str, tuple[str, str, Any]] = {
    "topk_keyframe_every": (
        "N",
        "with --compression topk:<f>: a new keyframe at least every N deltas (default: the node's)",
        _number,
    ),
    "topk_max_error": (
        "E",
        "with --compression topk:<f>: a new keyframe as soon as the readers' relative error "
        "exceeds E (default: the node's)",
        _number,
    ),
    "topk_keyframe": (
        "CODEC",
        "with --compression topk:<f>: how keyframes are stored: lossless, fp16, bf16 or "
        "int8 (default: int8; the deltas send what it rounds)",
        str,
    ),
}


def _add_compression_flags(sim: argparse.ArgumentParser) -> None:
    """``--compression`` and one ``--topk-...`` flag per ``topk_*`` option the node accepts (passed through)."""
    from flwr_serverless.simulation.update_options import flag_of

    group = sim.add_argument_group("compressed updates (see docs/protocol/compression.md)")
    group.add_argument(
        "--compression",
        type=typed(_compression),
        default=None,
        metavar="CODEC",
        help="what every node publishes: fp16, bf16, int8 or topk:<fraction> (default: float32 "
        "as trained); --mode aggregate takes fp16, bf16 or int8",
    )
    for name in topk_option_names():
        metavar, text, kind = _TOPK_FLAGS.get(
            name, ("VALUE", f"with --compression topk:<f>: the node option {name}", _number)
        )
        group.add_argument(flag_of(name), dest=name, type=kind, default=None, metavar=metavar, help=text)


def _given(**values: Any) -> dict[str, Any]:
    """The options the user set: an unset flag leaves the typed option at its default."""
    return {k: v for k, v in values.items() if v is not None}


def _config(args: argparse.Namespace, out: TextIO) -> SimulationConfig:
    strategy_options = dict(args.strategy_option)
    proximal_mu = args.proximal_mu
    if "proximal_mu" in strategy_options:
        mu = strategy_options.pop("proximal_mu")
        if proximal_mu is not None and mu != proximal_mu:
            raise ValueError(f"--strategy-option proximal_mu={mu} contradicts --proximal-mu {proximal_mu}")
        proximal_mu = float(mu)
        print(
            f"note: --strategy-option proximal_mu={mu} is applied as --proximal-mu {mu}: {PROXIMAL_MU_NOTE}.", file=out
        )
    async_given = _given(
        staleness=args.staleness,
        staleness_unit=args.staleness_unit,
        alpha=args.alpha,
        buffer_size=args.buffer_size,
        participation=args.participation,
    )
    semisync_given = _given(lambda_=args.lambda_, reestimate=False if args.no_reestimate else None)
    check_mode_flags(args.mode, async_given, semisync_given)
    partitioning = Partitioning(args.partitioner, dict(args.partitioner_option))
    if args.skew is not None and partitioning.kind != "skew":
        raise ValueError(f"option skew (--skew) applies to --partitioner skew only, not {partitioning.kind}")
    return SimulationConfig(
        num_nodes=args.nodes,
        mode=args.mode,
        strategy=args.strategy,
        strategy_options=strategy_options,
        store_url=args.store,
        storage_options=dict(args.storage_option),
        epochs=args.epochs,
        dataset=args.dataset,
        data_dir=args.data_dir,
        skew=args.skew if args.skew is not None else DEFAULT_SKEW,
        partitioning=partitioning,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        use_processes=args.processes,
        workers=args.workers,
        engine=args.engine,
        ray_address=args.address,
        framework=args.framework,
        sync_timeout=args.timeout,
        min_nodes=args.min_nodes,
        baselines=not args.no_baselines,
        baseline_cache=args.baseline_cache,
        max_train_examples=args.max_train_examples,
        proximal_mu=proximal_mu,
        async_options=AsyncOptions(**async_given),
        semisync=SemiSyncOptions(**semisync_given),
        heterogeneity=Heterogeneity(
            **_given(slowdown=args.slowdown, batch_seconds=args.batch_seconds, time_budget=args.time_budget)
        ),
        evaluation=Evaluation(eval_each_epoch=args.eval_each_epoch, eval_examples=args.eval_examples),
        compression=CompressionOptions(
            args.compression, _given(**{name: getattr(args, name) for name in topk_option_names()})
        ),
    )


def run_simulate(args: argparse.Namespace, out: TextIO) -> int:
    from flwr_serverless.simulation.seeds import (
        format_seed_summary,
        run_seeds,
        seed_summary,
        write_csv,
        write_nodes_csv,
    )

    config = _config(args, out)
    config.validate()
    seeds = args.seeds if args.seeds is not None else [config.seed]
    print(
        f"flwr-serverless simulate: {config.num_nodes} {config.mode} nodes, {config.strategy}, {config.dataset} "
        f"({partition_label(config)}), {config.epochs} epochs, {execution_label(config)}"
        + (f", seeds {', '.join(map(str, seeds))}" if args.seeds is not None else ""),
        file=out,
    )
    results = run_seeds(config, seeds, progress=ProgressPrinter(out, args.quiet))
    for result in results:
        print(format_report(result), file=out)
    if args.seeds is not None:
        print("\n" + format_seed_summary(results), file=out)
    if args.json:
        data: dict[str, Any] = (
            results[0].to_dict()
            if args.seeds is None
            else {"runs": [r.to_dict() for r in results], "summary": seed_summary(results)}
        )
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
        print(f"results written to {args.json}", file=out)
    if args.csv:
        write_csv(args.csv, results)
        print(f"one row per run written to {args.csv}", file=out)
    if args.nodes_csv:
        write_nodes_csv(args.nodes_csv, results)
        print(f"one row per node written to {args.nodes_csv}", file=out)
    return 0 if all(r.ok for r in results) else 1
