"""The Python blocks of README.md and docs/ run, so the documented API is the real one.

Every ```python block runs unless the line before it is ``<!-- snippet: skip REASON -->``; a block marked
``<!-- snippet: slow REASON -->`` runs with ``-m slow`` only. Blocks run in one subprocess per framework,
each in a fresh namespace and its own temporary folder, with this checkout first on ``PYTHONPATH``.
``s3://`` URLs reach the moto S3 server of the test session through ``AWS_ENDPOINT_URL`` (the same code a
user runs against S3), with the buckets the blocks name created first.

Also checked without a build: every benchmark marker in the docs renders from ``benchmarks/results`` (the
mkdocs hook), and the store layout page lists every key of the protocol.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flwr_serverless.wire import layout

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
MARK = re.compile(r"<!--\s*snippet:\s*(skip|slow)\b(.*?)-->\s*$")
BUCKET = re.compile(r"s3://([a-z0-9][a-z0-9.-]{2,62})/")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    code: str
    mark: str | None  # None, "skip" or "slow"
    reason: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def collect() -> list[Snippet]:
    pages = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)]
    found = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = MARK.search(before)
            kind, reason = (mark.group(1), mark.group(2).strip()) if mark else (None, "")
            found.append(Snippet(page, line, match.group(1), kind, reason))
    return found


SNIPPETS = collect()


# Blocks run grouped by the framework they import, one interpreter per group (TensorFlow and torch are imported
# once, not once per block); each block gets a fresh namespace and its own working folder.
RUNNER = """
import json, os, sys, traceback
blocks, failures = json.load(sys.stdin), {}
for index, block in enumerate(blocks):
    folder = os.path.join(os.getcwd(), f"block{index}")
    os.makedirs(folder)
    os.chdir(folder)
    try:
        exec(compile(block["code"], block["id"], "exec"), {"__name__": "__main__"})
    except BaseException:
        failures[block["id"]] = traceback.format_exc()[-3000:]
    finally:
        os.chdir("..")
print("@@results@@" + json.dumps(failures))
"""


def group_of(snippet: Snippet) -> str:
    if re.search(r"^\s*(import|from) (keras|tensorflow)\b", snippet.code, re.M):
        return "keras"
    if re.search(r"^\s*(import|from) (lightning|torch|pytorch_lightning)\b", snippet.code, re.M):
        return "lightning"
    return "plain"


def groups() -> list[Any]:
    out = []
    for slow in (False, True):
        by_group: dict[str, list[Snippet]] = {}
        for snippet in SNIPPETS:
            if snippet.mark == "skip" or (snippet.mark == "slow") != slow:
                continue
            by_group.setdefault(group_of(snippet), []).append(snippet)
        for name, members in sorted(by_group.items()):
            marks = [pytest.mark.slow] if slow else []
            out.append(pytest.param(members, id=f"{name}{'-slow' if slow else ''}", marks=marks))
    return out


def test_the_docs_have_runnable_quickstarts() -> None:
    """Not vacuous: the README's quickstarts and most docs blocks are collected and run."""
    readme = [s for s in SNIPPETS if s.path.name == "README.md" and s.mark is None]
    assert len(readme) >= 2, "README.md lost its runnable quickstart blocks"
    assert len([s for s in SNIPPETS if s.mark is None]) >= 10
    for snippet in SNIPPETS:
        assert snippet.mark is None or snippet.reason, f"{snippet.id}: a skipped or slow block says why"


@pytest.mark.parametrize("snippets", groups())
def test_snippets_run(snippets: list[Snippet], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    buckets = {bucket for snippet in snippets for bucket in BUCKET.findall(snippet.code)}
    if buckets:
        endpoint = request.getfixturevalue("moto_endpoint")  # also puts moto's fake credentials in os.environ
        client = request.getfixturevalue("s3_client")
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in buckets - existing:
            client.create_bucket(Bucket=bucket)
        env = {**env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}, "AWS_ENDPOINT_URL": endpoint}
    blocks = [{"id": snippet.id, "code": snippet.code} for snippet in snippets]
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120 + 60 * len(blocks),
    )
    assert "@@results@@" in result.stdout, f"the snippet runner died:\n{result.stderr[-4000:]}"
    failures = json.loads(result.stdout.rsplit("@@results@@", 1)[1])
    assert not failures, "\n\n".join(f"{block} failed:\n{trace}" for block, trace in failures.items())


def _hook() -> Any:
    spec = importlib.util.spec_from_file_location("bench_tables", DOCS / "_hooks" / "bench_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_marker_renders_from_the_results_files() -> None:
    """Every marker renders, and every results file is shown on some page (none is silently dropped)."""
    hook = _hook()
    for page in sorted(DOCS.rglob("*.md")):
        out = hook.CODE.sub("", hook.render_markers(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT))))
        assert "<!-- table:" not in out and "<!-- value:" not in out, page
    shown = {path.name for path in (ROOT / "benchmarks" / "results").glob("*.json")}
    assert shown and shown <= hook.LOADED, f"results files no page shows: {sorted(shown - hook.LOADED)}"


def test_an_unknown_marker_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = _hook()
    monkeypatch.setitem(hook.SCRIPT_TABLES, "shaped_x", ("no_such_script", "aggregate_mode.json"))
    with pytest.raises(Exception, match="no_such_script"):
        hook.script_table("shaped_x")("default")
    with pytest.raises(Exception, match="no_such_table"):
        hook.render_markers("<!-- table: no_such_table -->", "page.md")
    with pytest.raises(Exception, match=r"sweep\.99"):
        hook.render_markers("<!-- value: aggregate_mode.json sweep.99.nodes d -->", "page.md")


def test_store_layout_page_lists_every_key_of_the_protocol() -> None:
    page = (DOCS / "protocol" / "layout.md").read_text(encoding="utf-8")
    for pattern, _ in layout.LAYOUT:
        assert pattern in page, pattern


def test_readme_links_point_at_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10, local
    missing = [link for link in local if not (ROOT / link).is_file()]
    assert not missing, missing
