"""mkdocs hook: benchmark tables and figures come from ``benchmarks/results/*.json``, never typed into a page.

A page writes a marker and the build replaces it:

* ``<!-- table: NAME -->`` (or ``<!-- table: NAME FILE -->`` for the paper tables of another grid) becomes a
  Markdown table rendered from the results file by ``RENDERERS[NAME]``, followed by a line naming the file.
* ``<!-- value: FILE PATH FORMAT -->`` becomes one number: ``PATH`` is a dotted path into the JSON (list
  indexes are numbers), ``FORMAT`` a Python format spec (``.3f``, ``.0%``, ``,.0f``).

``on_files`` also adds ``CHANGELOG.md``, ``CONTRIBUTING.md`` and every ``benchmarks/results/*.png`` to the
site, so pages link them as ``changelog.md`` and ``benchmarks/results/<name>.png`` and ``--strict`` checks
those links like any other. A marker naming an unknown table, file or path fails the build with its name.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
EXTRA_PAGES = {"changelog.md": ROOT / "CHANGELOG.md", "contributing.md": ROOT / "CONTRIBUTING.md"}

TABLE = re.compile(r"<!--\s*table:\s*([\w.-]+)(?:\s+([\w.-]+))?\s*-->")
CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)
VALUE = re.compile(r"<!--\s*value:\s*([\w.-]+)\s+([\w.:+-]+)\s+(\S+)\s*-->")


LOADED: set[str] = set()  # results files some marker read (the tests check every file is shown somewhere)


@cache
def load(name: str) -> Any:
    """One results file, parsed once per build."""
    path = RESULTS / (name if name.endswith(".json") else f"{name}.json")
    LOADED.add(path.name)
    if not path.is_file():
        raise PluginError(f"benchmark results file not found: {path.relative_to(ROOT)}")
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def lookup(data: Any, dotted: str, source: str) -> Any:
    """``summary.aggregate.accuracy_mean`` or ``sweep.3.requests_mean`` inside a parsed results file."""
    node = data
    for part in dotted.split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise PluginError(f"{source}: no value at {dotted!r} (failed at {part!r})") from None
    return node


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def source_line(*names: str, note: str = "") -> str:
    files = ", ".join(f"`benchmarks/results/{name}`" for name in names)
    return f"\n\n*Generated from {files}{note}.*"


def load_note(data: Any) -> str:
    """The load average a run recorded, when it recorded one (newer runs do)."""
    for key in ("load_average", "loadavg", "load"):
        value = data.get(key) if isinstance(data, dict) else None
        if value is None and isinstance(data, dict) and isinstance(data.get("setup"), dict):
            value = data["setup"].get(key)
        if value is not None:
            shown = ", ".join(f"{v:.1f}" for v in value) if isinstance(value, list) else str(value)
            return f"; load average during the run: {shown}"
    return ""


def pct(value: float) -> str:
    return f"{value:.0%}"


def ci(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    half = cell.get("ci95")
    return f"{cell['mean']:.3f} ± {half:.3f}" if half is not None and not math.isnan(half) else f"{cell['mean']:.3f}"


# --- paper grids (paper_<grid>.json) ---------------------------------------------------------------------

# The flwr-serverless paper's figures (MNIST), shown in parentheses beside ours: constants of the paper,
# not results of this project (the paper report of the grid holds the same ones).
PAPER_TABLE1 = {
    "sync": {0.0: 0.987, 0.9: 0.983, 1.0: 0.894},
    "async": {0.0: 0.985, 0.9: 0.976, 1.0: 0.734},
    "centralized": {0.0: 0.987, 0.9: 0.987, 1.0: 0.987},
}
PAPER_TABLE2 = {
    "fedavg sync": {2: 0.983, 3: 0.983, 5: 0.979},
    "fedavgm sync": {2: 0.983, 3: 0.983, 5: 0.979},
    "fedadam sync": {2: 0.976, 3: 0.970, 5: 0.962},
}


def with_paper(cell: dict[str, Any] | None, paper: float | None) -> str:
    text = ci(cell)
    return f"{text} ({paper:.3f})" if paper is not None and text != "-" else text


def paper_table1(grid: str) -> str:
    name = f"paper_{grid}.json"
    t = lookup(load(name), "tables.table1", name)
    skews = t["skews"]
    rows = [
        [label] + [with_paper(cells.get(str(s)), PAPER_TABLE1.get(label, {}).get(s)) for s in skews]
        for label, cells in t["rows"].items()
    ]
    return table(["model"] + [f"skew {s}" for s in skews], rows) + source_line(name)


def paper_table2(grid: str) -> str:
    name = f"paper_{grid}.json"
    t = lookup(load(name), "tables.table2", name)
    nodes = t["nodes"]
    rows = [
        [label] + [with_paper(cells.get(str(n)), PAPER_TABLE2.get(label, {}).get(n)) for n in nodes]
        for label, cells in t["rows"].items()
    ]
    return table(["strategy, mode"] + [f"{n} nodes" for n in nodes], rows) + source_line(name)


def paper_hetero(grid: str) -> str:
    name = f"paper_{grid}.json"
    t = lookup(load(name), "tables.hetero", name)
    targets = t["targets"]
    rows = []
    for mode, row in t["rows"].items():
        reach = []
        for target in targets:
            cell = row["time_to_target"][str(target)]
            if cell.get("mean") is not None:
                reach.append(f"{cell['mean']:.1f} s")
            else:
                reach.append(f"reached in {cell['reached']} of {cell['runs']}")
        lag = row.get("peer_lag_max")
        epochs = " / ".join(f"{e:.1f}" for e in row["epochs_per_node"])
        rows.append([mode, *reach, ci(row["final"]), epochs, "-" if lag is None else f"{lag:.0f}"])
    header = ["mode", *[f"time to {t}" for t in targets], "final accuracy", "epochs per node", "max peer lag"]
    return table(header, rows) + source_line(name)


def paper_claims(grid: str) -> str:
    name = f"paper_{grid}.json"
    claims = lookup(load(name), "claims", name)
    rows = [[c["claim"], c["measured"], f"**{c['verdict']}**"] for c in claims]
    return table(["claim", "measured", "verdict"], rows) + source_line(name)


# --- aggregate mode -----------------------------------------------------------------------------------------


def aggregate_sweep(_: str) -> str:
    name = "aggregate_mode.json"
    data = load(name)
    by_n: dict[int, dict[str, dict[str, Any]]] = {}
    for row in data["sweep"]:
        by_n.setdefault(row["nodes"], {})[row["mode"]] = row
    rows = []
    for n in sorted(by_n):
        peers, agg = by_n[n].get("all-peers"), by_n[n].get("aggregate")
        if not peers or not agg:
            continue
        rows.append(
            [
                n,
                f"{peers['requests_mean']:.1f}",
                f"{peers['models_down_mean']:.1f}",
                f"{peers['seconds_median']:.3g}",
                f"{agg['requests_mean']:.1f} ({agg['requests_max']})",
                f"{agg['models_down_mean']:.2f} ({agg['models_down_max']:.2f})",
                f"{agg['seconds_median']:.3g}",
                pct(agg["conflict_rate"]),
                agg["lost_all_attempts"],
                agg["folded_by_helper"],
                f"{agg['deferred_epochs']} of {agg['node_epochs_all']}",
            ]
        )
    header = [
        "N",
        "all-peers requests",
        "all-peers models down",
        "all-peers s / federation",
        "aggregate requests (max)",
        "aggregate models down (max)",
        "aggregate s / federation",
        "conflict rate",
        "lost all attempts",
        "folded by a helper",
        "epochs deferred",
    ]
    return table(header, rows) + source_line(name, note=load_note(data))


def _contention_rows(data: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for row in data["contention"]:
        deferred, total = row["deferred_epochs"], row["node_epochs_all"]
        rows.append(
            [
                f"{row['epoch_seconds']:g} s",
                f"{row['nodes'] / row['epoch_seconds']:.3g} / s",
                f"{row['requests_mean']:.1f} ({row['requests_max']})",
                f"{row['models_down_mean']:.2f} ({row['models_down_max']:.2f})",
                pct(row["conflict_rate"]),
                row["lost_all_attempts"],
                row["folded_by_helper"],
                f"{deferred} of {total} ({deferred / total:.0%})",
                f"{row['members_latest_folded']} of {row['members_in_table']}",
            ]
        )
    return rows


CONTENTION_HEADER = [
    "epoch",
    "writes offered",
    "requests (max)",
    "models down (max)",
    "conflict rate",
    "lost all attempts",
    "folded by a helper",
    "epochs deferred",
    "members whose latest contribution is in the final aggregate",
]


def aggregate_contention(_: str) -> str:
    name = "aggregate_mode.json"
    data = load(name)
    return table(CONTENTION_HEADER, _contention_rows(data)) + source_line(name, note=load_note(data))


def aggregate_helping_off(_: str) -> str:
    name = "aggregate_mode_helping_off.json"
    data = load(name)
    merged = {"contention": data["sweep"] + data["contention"]}
    return table(CONTENTION_HEADER, _contention_rows(merged)) + source_line(name, note=load_note(data))


def aggregate_accuracy(_: str) -> str:
    name = "aggregate_accuracy.json"
    data = load(name)
    rows = [
        [
            mode,
            f"{s['accuracy_mean']:.3f} ± {s['accuracy_stdev']:.3f}",
            f"{s['requests_per_node_epoch']:.1f}",
            f"{s['bytes_down_per_node_epoch'] / 1000:,.0f} KB",
        ]
        for mode, s in data["summary"].items()
    ]
    setup = data["setup"]
    note = f" ({setup['dataset']}, {setup['nodes']} nodes, skew {setup['skew']}, {setup['epochs']} epochs)"
    header = ["mode", "final accuracy (mean ± sd over seeds)", "requests / node-epoch", "bytes down / node-epoch"]
    return table(header, rows) + source_line(name, note=note)


# --- compression ----------------------------------------------------------------------------------------------


def compression(_: str) -> str:
    name = "compression.json"
    data = load(name)
    rows = []
    for e in data["encodings"]:
        drift = e.get("drift")
        label = e["encoding"].split(" drift")[0] + (" (keyframe included)" if drift is not None else "")
        error = f"{e['relative_error']:.2g}" + (f" at drift scale {drift:g} per update" if drift is not None else "")
        rows.append([label, f"{e['bytes_per_update'] / 1e6:.2f}", error])
    note = f" ({data['params']:,} float32 parameters, {data['updates']} updates)"
    return table(["encoding", "MB per update", "relative error (worst over the deltas)"], rows) + source_line(
        name, note=note
    )


def compression_hashing(_: str) -> str:
    name = "compression.json"
    h = load(name)["hashing"]
    rows = [[key.removesuffix("_s").replace("_", " "), f"{value * 1000:.1f} ms"] for key, value in h.items()]
    return table(["step (40 MB payload)", "time"], rows) + source_line(name)


def compression_training(variants: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for label, s in variants.items():
        delta = s["accuracy_delta"]
        shown = f"{s['accuracy_mean']:.3f} ± {s['accuracy_stdev']:.3f}"
        shown += f" ({delta:+.3f})" if label != "none" else ""
        rows.append(
            [
                label,
                f"{s['bytes_up_per_node_epoch']:,.0f}",
                "-" if label == "none" else pct(s["bytes_up_cut"]),
                f"{s['bytes_down_per_node_epoch']:,.0f}",
                "-" if label == "none" else pct(s["bytes_down_cut"]),
                shown,
            ]
        )
    return rows


TRAINING_HEADER = ["encoding", "bytes up / node-epoch", "cut", "bytes down / node-epoch", "cut", "final accuracy"]


def _compression_accuracy(name: str) -> str:
    data = load(name)
    setup = data["setup"]
    note = (
        f" ({setup['dataset']}, {setup['mode']}, {setup['nodes']} nodes, skew {setup['skew']}, "
        f"{setup['epochs']} epochs, seeds {setup['seeds']})"
    )
    return table(TRAINING_HEADER, compression_training(data["summary"])) + source_line(name, note=note)


def compression_accuracy_fashion(_: str) -> str:
    return _compression_accuracy("compression_accuracy_fashion.json")


def compression_accuracy_digits(_: str) -> str:
    return _compression_accuracy("compression_accuracy.json")


def compression_accuracy_sync(_: str) -> str:
    return _compression_accuracy("compression_accuracy_sync.json")


# --- store overhead, local store, heterogeneous speed ---------------------------------------------------------


def store_overhead(_: str) -> str:
    labels = {
        "store_overhead_boto3.json": "boto3 (default for `s3://`)",
        "store_overhead_fsspec.json": 's3fs (`backend="fsspec"`)',
        "store_overhead_boto3_memory_cache.json": 'boto3, `peer_cache="memory"`',
    }
    rows = []
    for name, label in labels.items():
        d = load(name)
        rows.append(
            [
                label,
                f"{d['ratio']:.2f}",
                f"{d['federation_s_median']:.3f} s",
                f"{d['requests_per_node_epoch']:.0f} (= 2 + {d['changed_peers_per_epoch']:.0f} changed peers)",
                f"{d['peak_memory_x_model']:.2f}x model",
            ]
        )
    header = ["backend", "ratio to floor", "median step", "requests per node-epoch", "peak allocation per step"]
    return table(header, rows) + source_line(*labels)


def local_store(_: str) -> str:
    name = "local_store.json"
    data = load(name)
    rows = [
        [r["case"], f"{r['ratio']:.2f}", f"{r['federation_s_median']:.3f} s", f"{r['floor_s_median']:.3f} s"]
        for r in data["results"]
    ]
    header = ["case", "ratio to floor", "step or round (median)", "floor (median)"]
    return table(header, rows) + source_line(name, note=f" ({data.get('cpus', '?')} CPUs{load_note(data)})")


HETERO_LABELS = {
    "sync": "Sync",
    "async": "Async (FedAvgAsync)",
    "async+fedrec": "Async+FedRec, `poly:0.5` steps",
    "fedasync": "FedAsync, `poly:0.5` versions, alpha 0.6",
    "async+fedrec-hinge": "Async+FedRec, `hinge:0.05,100` steps",
    "fedasync-hinge": "FedAsync, `hinge:0.5,8` versions, alpha 0.9",
    "fedbuff": "FedBuff, K = 2",
    "semisync": "SemiSync, lambda 1",
}


def heterogeneous(_: str) -> str:
    name = "heterogeneous.json"
    data = load(name)
    targets = data["targets"]
    rows = []
    for mode, m in data["modes"].items():
        reach = [
            "-" if m["time_to_target"].get(str(t)) is None else f"{m['time_to_target'][str(t)]:.1f} s" for t in targets
        ]
        rows.append([HETERO_LABELS.get(mode, mode), *reach, f"{m['last_5s_accuracy']:.3f}", m["requests"]])
    header = ["mode", *[f"time to {t}" for t in targets], "final (mean of the last 5 s)", "requests"]
    note = (
        f" ({data['budget_seconds']:g} s budget, slowdown {data['slowdown']}, "
        f"batches padded to {data['batch_seconds']:g} s)"
    )
    return table(header, rows) + source_line(name, note=note)


# --- tables a benchmark script renders itself (its ``markdown_table(results)``) ------------------------------

# marker name -> (script in benchmarks/, the results file it renders)
SCRIPT_TABLES = {
    "aggregate_mode_shaped": ("aggregate_mode", "aggregate_mode_shaped.json"),
    "store_overhead_shaped": ("store_overhead", "store_overhead_boto3_shaped.json"),
    "language_model_quick": ("language_model_report", "language_model_quick.json"),
    "language_model": ("language_model_report", "language_model.json"),
}


def script_table(name: str) -> Callable[[str], str]:
    """A renderer calling ``benchmarks/<script>.py``'s ``markdown_table`` on its results file."""

    def render(_: str) -> str:
        script, results = SCRIPT_TABLES[name]
        path = ROOT / "benchmarks" / f"{script}.py"
        spec = importlib.util.spec_from_file_location(f"_bench_{script}", path)
        if spec is None or spec.loader is None or not path.is_file():
            raise PluginError(f"table {name!r}: no benchmark script {path.relative_to(ROOT)}")
        sys.path.insert(0, str(path.parent))  # the scripts import their helpers from benchmarks/
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
        if not callable(getattr(module, "markdown_table", None)):
            raise PluginError(f"table {name!r}: {path.relative_to(ROOT)} has no markdown_table(results)")
        data = load(results)
        return module.markdown_table(data) + source_line(results, note=load_note(data))

    return render


RENDERERS: dict[str, Callable[[str], str]] = {
    "paper_table1": paper_table1,
    "paper_table2": paper_table2,
    "paper_hetero": paper_hetero,
    "paper_claims": paper_claims,
    "aggregate_mode": aggregate_sweep,
    "aggregate_contention": aggregate_contention,
    "aggregate_helping_off": aggregate_helping_off,
    "aggregate_accuracy": aggregate_accuracy,
    "compression": compression,
    "compression_hashing": compression_hashing,
    "compression_accuracy_fashion": compression_accuracy_fashion,
    "compression_accuracy_digits": compression_accuracy_digits,
    "compression_accuracy_sync": compression_accuracy_sync,
    "store_overhead": store_overhead,
    "local_store": local_store,
    "heterogeneous": heterogeneous,
    **{name: script_table(name) for name in SCRIPT_TABLES},
}


def render_markers(markdown: str, where: str) -> str:
    """Replace every table and value marker of one page; an unknown name fails the build, naming the page."""

    def one_table(match: re.Match[str]) -> str:
        name, argument = match.group(1), match.group(2) or "default"
        if name not in RENDERERS:
            raise PluginError(f"{where}: unknown table {name!r}; known: {', '.join(sorted(RENDERERS))}")
        return RENDERERS[name](argument)

    def one_value(match: re.Match[str]) -> str:
        name, dotted, spec = match.groups()
        value = lookup(load(name), dotted, f"{where}: {name}")
        try:
            return format(value, spec)
        except (TypeError, ValueError) as error:
            raise PluginError(f"{where}: cannot format {name} {dotted} = {value!r} with {spec!r}: {error}") from None

    parts = CODE.split(markdown)  # markers quoted in code (fences, `spans`) stay as written
    for i in range(0, len(parts), 2):
        parts[i] = VALUE.sub(one_value, TABLE.sub(one_table, parts[i]))
    return "".join(parts)


# --- mkdocs events ----------------------------------------------------------------------------------------------


def on_files(files: Files, config: Any) -> Files:
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{png.name}", abs_src_path=str(png)))
    for uri, path in EXTRA_PAGES.items():
        if path.is_file() and files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_pre_build(config: Any) -> None:
    load.cache_clear()  # a results file rewritten during `mkdocs serve` shows on the next build


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    return render_markers(markdown, page.file.src_uri)
