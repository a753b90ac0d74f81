"""The benchmark's report: a Markdown page and a plot of latency against offered rate."""

from __future__ import annotations

import datetime
import math
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Level


def _q(values: list[float], q: float) -> float:
    from bench.run import quantile

    return quantile(values, q) * 1000


def best(levels: list[Level]) -> Level | None:
    """The highest rate sustained."""
    sustained = [level for level in levels if level.sustained]
    return max(sustained, key=lambda level: level.rate) if sustained else None


def plot(path: Path, bare: list[Level], saga: list[Level], slo: float) -> None:
    """Completion latency p50 and p99 against offered rate, both systems."""
    # Imported here: matplotlib comes with the bench extra, and the ladder's logic
    # (bench.run) is tested without it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for levels, colour in ((bare, "tab:gray"), (saga, "tab:blue")):
        if not levels:
            continue
        name = levels[0].system
        rates = [level.rate for level in levels]
        ax.plot(
            rates,
            [_q(lv.latencies, 0.99) for lv in levels],
            "o-",
            color=colour,
            label=f"{name} p99",
        )
        ax.plot(
            rates,
            [_q(lv.latencies, 0.5) for lv in levels],
            "o--",
            color=colour,
            alpha=0.6,
            label=f"{name} p50",
        )
    ax.axhline(slo * 1000, color="tab:red", linewidth=0.8, label=f"objective: p99 < {slo:g} s")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (per second)")
    ax.set_ylabel("completion latency (ms, log scale)")
    ax.set_title("Order saga vs bare Celery chord, same workers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _share(ratio: float, of: str) -> str:
    """The saga's rate as a share of the bare chord's, or "no share" when either
    sustained no rate of the ladder (under ``--profile``, say)."""
    if math.isnan(ratio):
        return f"no share of {of}: a system sustained no rate"
    return f"**{ratio:.0%}** of {of}"


def _row(level: Level) -> str:
    post = (
        (
            f"{_q(level.post_latencies, 0.5):.1f} / {_q(level.post_latencies, 0.95):.1f} / "
            f"{_q(level.post_latencies, 0.99):.1f}"
        )
        if level.post_latencies
        else "-"
    )
    return (
        f"| {level.rate:.0f} | {level.throughput:.1f} | {post} | "
        f"{_q(level.latencies, 0.5):.1f} / {_q(level.latencies, 0.95):.1f} / "
        f"{_q(level.latencies, 0.99):.1f} | {level.errors + level.offered - level.completed} "
        f"| {'yes' if level.sustained else 'no'} |"
    )


def _costs(level: Level) -> list[str]:
    groups = sorted(level.cpu_ms)
    cpu = ", ".join(f"{g} {level.cpu_ms[g]:.2f}" for g in groups)
    total = sum(level.cpu_ms.values())
    mem = ", ".join(f"{g} {level.peak_rss_mb.get(g, 0):.0f}" for g in groups)
    return [
        f"- CPU ms per {level.system} ({total:.1f} in all): {cpu}",
        f"- Redis commands per {level.system}: {level.redis_commands:.1f}; "
        f"database transactions: {level.db_transactions:.2f}; "
        f"database connections opened: {level.db_sessions:.3f}",
        f"- peak memory (MiB): {mem}",
    ]


def write_report(
    out: Path, bare: list[Level], saga: list[Level], slo: float, args: dict[str, Any]
) -> str:
    """Write report.md and latency.png under ``out``; return the report's text."""
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "latency.png", bare, saga, slo)
    top_bare, top_saga = best(bare), best(saga)
    ratio = (top_saga.rate / top_bare.rate) if top_bare and top_saga else float("nan")
    at50 = next((lv for lv in saga if lv.rate == 50), None)
    header = (
        "| offered/s | done/s | POST p50/p95/p99 ms | completion p50/p95/p99 ms "
        "| unfinished | sustained |"
    )
    rule = "|---|---|---|---|---|---|"
    lines = [
        "# Benchmark: order saga vs bare Celery chord",
        "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({platform.machine()}, {__import__('os').cpu_count()} cores), "
        f"{args['duration']:.0f} s per rate, worker `-c {args['concurrency']}`"
        f"{'' if args.get('no_events') else ' -E'}, PostgreSQL fsync on, Redis AOF, "
        f"saga steps joined by `{args.get('saga_join', 'chord')}` (`SAGA_JOIN`). "
        "Load generator, API, workers, beat, PostgreSQL and Redis share the machine.",
        "",
        "## Summary",
        "",
        f"- Highest rate with p99 completion under {slo:g} s: bare chord "
        f"{top_bare.rate if top_bare else 0:.0f}/s, saga {top_saga.rate if top_saga else 0:.0f}/s "
        f"({_share(ratio, 'the bare chord')}).",
    ]
    if at50:
        lines.append(
            f"- At 50 orders/s: POST p99 {_q(at50.post_latencies, 0.99):.1f} ms; saga p50 "
            f"{_q(at50.latencies, 0.5):.1f} ms, p99 {_q(at50.latencies, 0.99):.1f} ms."
        )
    lines += ["", "![latency against offered rate](latency.png)", ""]
    for name, levels in (("Bare chord", bare), ("Order saga", saga)):
        lines += [f"## {name}", "", header, rule, *(_row(lv) for lv in levels), ""]
    lines += ["## Cost of one operation (at the highest sustained rate)", ""]
    for level in (top_bare, top_saga):
        if level:
            lines += [f"**{level.system}** at {level.rate:.0f}/s:", *_costs(level), ""]
    if args.get("saga_join", "chord") == "chord":
        lines += [
            "By design a saga is 3 task executions (2 steps, 1 completion) and 3 broker",
            "messages, like the bare chord; the database transactions above include the",
            "API's (accept, and the batched removal of outbox entries) and the workers' (each",
            "step, the completion).",
        ]
    else:
        lines += [
            "With the database join a saga is 2 task executions and 2 broker messages (no",
            "chord keys, no body): each step, once its outcome commits, completes the saga",
            "if the other has an outcome too; the database transactions above include the",
            "API's (accept, and the batched removal of outbox entries) and the workers' (each",
            "step, and each step's completion attempt).",
        ]
    lines += [
        "Completion latency is measured from the moment a request was due (open loop) or",
        "published, to the saga's recorded end (or the chord body's run). Unfinished: refused",
        "(not 202), or not finished within 10 s of the level's end (still running, not",
        "lost: the next level starts on top of them).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def join_section(join: str, saga: list[Level], bare: list[Level], slo: float) -> str:
    """The order saga on a second stack, joined by ``join``: its ladder, its highest
    sustained rate against the bare chord of the same run, and its cost there."""
    header = (
        "| offered/s | done/s | POST p50/p95/p99 ms | completion p50/p95/p99 ms "
        "| unfinished | sustained |"
    )
    top_bare, top_saga = best(bare), best(saga)
    ratio = (top_saga.rate / top_bare.rate) if top_bare and top_saga else float("nan")
    lines = [
        "",
        f"## Order saga, steps joined by `{join}` (a stack of its own, same run)",
        "",
        f"- Highest rate with p99 completion under {slo:g} s: "
        f"{top_saga.rate if top_saga else 0:.0f}/s ({_share(ratio, 'the bare chord above')}).",
    ]
    at50 = next((lv for lv in saga if lv.rate == 50), None)
    if at50:
        lines.append(
            f"- At 50 orders/s: POST p99 {_q(at50.post_latencies, 0.99):.1f} ms; saga p50 "
            f"{_q(at50.latencies, 0.5):.1f} ms, p99 {_q(at50.latencies, 0.99):.1f} ms."
        )
    lines += ["", header, "|---|---|---|---|---|---|", *(_row(lv) for lv in saga), ""]
    if top_saga:
        lines += [f"**saga ({join})** at {top_saga.rate:.0f}/s:", *_costs(top_saga), ""]
    return "\n".join(lines) + "\n"
