"""The papers' claims, each checked against the measured tables with a stated criterion.

A verdict is only as good as its criterion, so each one is written into the
``measured`` text; "similar" means the difference is within the larger of the
two 95% CI half-widths (or 0.01 when an interval is missing). A similarity
claim whose intervals are wider than ``WIDE`` cannot tell: it is "inconclusive".
"""

from __future__ import annotations

import math
from typing import Any

REPRODUCES, PARTLY, FAILS, NA = "reproduces", "partly", "does not reproduce", "not measured"
INCONCLUSIVE = "inconclusive (CIs too wide)"
WIDE = 0.05


def _m(stat: dict[str, Any] | None) -> float | None:
    return None if not stat else stat.get("mean")


def _similar(a: dict[str, Any], b: dict[str, Any]) -> bool:
    tolerance = max(a.get("ci95") or 0.01, b.get("ci95") or 0.01)
    return abs(a["mean"] - b["mean"]) <= tolerance


def _similar_verdict(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    if any(max(a.get("ci95") or 0.0, b.get("ci95") or 0.0) > WIDE for a, b in pairs):
        return INCONCLUSIVE
    return _verdict([_similar(a, b) for a, b in pairs])


def _lower(low: dict[str, Any], high: dict[str, Any]) -> str:
    """Is ``low`` below ``high``: beyond the CIs (reproduces), within wide ones (inconclusive), else not."""
    if _m(low) >= _m(high):
        return FAILS
    if not _similar(low, high):
        return REPRODUCES
    return INCONCLUSIVE if max(low.get("ci95") or 0.0, high.get("ci95") or 0.0) > WIDE else FAILS


def _combine(verdicts: list[str]) -> str:
    if len(set(verdicts)) == 1:
        return verdicts[0]
    return PARTLY if REPRODUCES in verdicts else (FAILS if FAILS in verdicts else INCONCLUSIVE)


def _claim(claim: str, measured: str, verdict: str) -> dict[str, str]:
    return {"claim": claim, "measured": measured, "verdict": verdict}


def _verdict(results: list[bool]) -> str:
    return REPRODUCES if all(results) else (PARTLY if any(results) else FAILS)


def table1_claims(t: dict[str, Any]) -> list[dict[str, str]]:
    rows, out = t["rows"], []
    low = [s for s in ("0.0", "0.9") if s in rows["sync"] and _m(rows["sync"][s]) is not None]
    if low:
        text = "; ".join(f"skew {s}: sync {_m(rows['sync'][s]):.3f} vs async {_m(rows['async'][s]):.3f}" for s in low)
        out.append(
            _claim(
                "Sync ≈ async at low skew", text, _similar_verdict([(rows["sync"][s], rows["async"][s]) for s in low])
            )
        )
        gaps = {s: _m(rows["centralized"][s]) - max(_m(rows["sync"][s]), _m(rows["async"][s])) for s in low}
        out.append(
            _claim(
                "Both near centralized at low skew (gap ≤ 0.02)",
                "; ".join(f"skew {s}: gap {g:+.3f}" for s, g in gaps.items()),
                _verdict([g <= 0.02 for g in gaps.values()]),
            )
        )
    if "1.0" in rows["sync"] and "0.9" in rows["sync"]:
        s1, a1 = rows["sync"]["1.0"], rows["async"]["1.0"]
        drops = {m: _m(rows[m]["0.9"]) - _m(rows[m]["1.0"]) for m in ("sync", "async")}
        out.append(
            _claim(
                "At full skew both drop (by > 0.02 from skew 0.9)",
                f"sync -{drops['sync']:.3f}, async -{drops['async']:.3f}",
                _verdict([d > 0.02 for d in drops.values()]),
            )
        )
        out.append(
            _claim(
                "At full skew async drops more than sync",
                f"sync {_m(s1):.3f}, async {_m(a1):.3f} (difference {_m(a1) - _m(s1):+.3f}, "
                f"CI ± {max(s1.get('ci95') or 0, a1.get('ci95') or 0):.3f})",
                _lower(a1, s1),
            )
        )
        if s1.get("sd") is not None and a1.get("sd") is not None:
            ratio = a1["sd"] / max(s1["sd"], 1e-9)
            out.append(
                _claim(
                    "At full skew async varies much more than sync (sd ratio > 2; paper 0.114/0.02)",
                    f"sd sync {s1['sd']:.3f}, async {a1['sd']:.3f} (ratio {ratio:.1f})",
                    REPRODUCES if ratio > 2 else FAILS,
                )
            )
    spread = t.get("per_node", {})
    if "1.0" in spread.get("sync", {}) and spread["sync"]["1.0"].get("sd") is not None:
        s_sd, a_sd = spread["sync"]["1.0"]["sd"], spread["async"]["1.0"]["sd"]
        out.append(
            _claim(
                "At full skew async's final models vary more than sync's (sd over nodes x seeds, ratio > 2)",
                f"sd sync {s_sd:.3f}, async {a_sd:.3f} (ratio {a_sd / max(s_sd, 1e-9):.1f})",
                REPRODUCES if a_sd > 2 * s_sd else FAILS,
            )
        )
    skewed = [s for s in ("0.9", "1.0") if s in rows["standalone"] and _m(rows["standalone"][s]) is not None]
    if skewed:
        oks, parts = [], []
        for s in skewed:
            for mode in ("sync", "async"):
                oks.append(_m(rows[mode][s]) > _m(rows["standalone"][s]))
                parts.append(f"skew {s} {mode} {_m(rows[mode][s]):.3f} vs {_m(rows['standalone'][s]):.3f}")
        out.append(_claim("Federation beats standalone under skew", "; ".join(parts), _verdict(oks)))
    return out


def table2_claims(t: dict[str, Any]) -> list[dict[str, str]]:
    rows, nodes, out = t["rows"], [str(n) for n in t["nodes"]], []
    if {"fedavg sync", "fedavgm sync", "fedadam sync"} <= set(rows):
        below, parts = [], []
        for n in nodes:
            avg, avgm, adam = rows["fedavg sync"][n], rows["fedavgm sync"][n], rows["fedadam sync"][n]
            below += [_lower(adam, avg), _lower(adam, avgm)]
            parts.append(f"{n} nodes: {_m(avg):.3f} / {_m(avgm):.3f} / {_m(adam):.3f}")
        out.append(
            _claim(
                "FedAvg ≈ FedAvgM (sync)",
                "; ".join(parts),
                _similar_verdict([(rows["fedavg sync"][n], rows["fedavgm sync"][n]) for n in nodes]),
            )
        )
        out.append(_claim("FedAdam below both (sync)", "; ".join(parts), _combine(below)))
    if "fedavg sync" in rows and len(nodes) > 1:
        first, last = rows["fedavg sync"][nodes[0]], rows["fedavg sync"][nodes[-1]]
        out.append(
            _claim(
                "More nodes, lower accuracy (FedAvg sync)",
                f"{nodes[0]} nodes {_m(first):.3f}, {nodes[-1]} nodes {_m(last):.3f}",
                _lower(last, first),
            )
        )
    asyncs = [label for label in rows if label.endswith(" async")]
    if asyncs:
        pairs = [(label, n) for label in asyncs for n in nodes if label.replace("async", "sync") in rows]
        lower = [_m(rows[label][n]) <= _m(rows[label.replace("async", "sync")][n]) for label, n in pairs]
        out.append(
            _claim(
                "Async rows a little lower than sync (table 2)",
                f"async ≤ sync in {sum(lower)} of {len(lower)} cells",
                _verdict(lower),
            )
        )
    return out


def hetero_claims(h: dict[str, Any]) -> list[dict[str, str]]:
    rows, out = h["rows"], []
    if not h["targets"] or not {"semisync", "sync", "async"} <= set(rows):
        return out
    target = str(h["targets"][0])

    def times(label: str) -> list[float]:  # per run (seeds in the same order for every mode); inf: never
        return [math.inf if v is None else v for v in rows[label]["time_to_target"][target]["values"]]

    semi = times("semisync")
    wins = {other: sum(a < b for a, b in zip(semi, times(other))) for other in ("sync", "async")}
    shown = {
        label: " / ".join("never" if math.isinf(v) else f"{v:.1f} s" for v in times(label))
        for label in ("semisync", "sync", "async")
    }
    text = (
        f"sooner than sync in {wins['sync']} of {len(semi)} runs, than async in {wins['async']} of {len(semi)} "
        f"(per run: semisync {shown['semisync']}; sync {shown['sync']}; async {shown['async']})"
    )
    verdict = REPRODUCES if min(wins.values()) == len(semi) else (FAILS if not any(wins.values()) else PARTLY)
    out.append(
        _claim(f"SemiSync reaches {target} sooner than Sync and Async (one node 4x, one 10x slower)", text, verdict)
    )
    s_sync, s_async = rows["sync"]["final"], rows["async"]["final"]
    if s_sync.get("sd") is not None and s_async.get("sd") is not None:
        out.append(
            _claim(
                "With really stale peers async is less accurate or more variable than sync",
                f"final sync {_m(s_sync):.3f} (sd {s_sync['sd']:.3f}), async {_m(s_async):.3f} "
                f"(sd {s_async['sd']:.3f}); max peer lag {rows['async']['peer_lag_max']}",
                REPRODUCES if _m(s_async) < _m(s_sync) or s_async["sd"] > 2 * s_sync["sd"] else FAILS,
            )
        )
    return out


def claims(tables: dict[str, Any]) -> list[dict[str, str]]:
    """Every claim whose cells were all measured (a failed or missing cell leaves its claims out)."""
    out: list[dict[str, str]] = []
    for name, check in (("table1", table1_claims), ("table2", table2_claims), ("hetero", hetero_claims)):
        if name not in tables:
            continue
        try:
            out += check(tables[name])
        except (TypeError, KeyError) as exc:  # a None mean or a missing row
            out.append(_claim(f"claims of {name}", f"incomplete data ({type(exc).__name__}: {exc})", NA))
    return out
