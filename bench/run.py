"""``make bench``: the order saga's throughput and latency next to a bare Celery chord.

Starts PostgreSQL (fsync on) and Redis (append-only file, as in docker-compose.yml),
then the API under gunicorn, a worker per lane, the event consumers and beat as the
Procfile runs them. On that
stack it offers an open-loop load at a ladder of fixed rates, first of bare chords (two
no-op members and a no-op body, published like a saga's), then of orders over HTTP, and
reports per rate: completions/s, POST latency, completion latency, errors, CPU per
process group and peak memory; the highest rate each sustains with p99 under 1 s, and
their ratio. The report goes to bench/results/report.md with a plot, latency.png.

    python -m bench.run [--duration 15] [--rates 50,100,...] [--concurrency 3] [--out DIR]
    python -m bench.run --only saga --scaling 1,2,3   # the scaling curve, no report
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from redis import Redis
from sqlalchemy import create_engine, insert, text

from bench.history import Loaded, load_history
from bench.httpload import post_json, run_load
from bench.profile import Profiler
from bench.profile import report as profile_report
from bench.report import join_section, write_report
from config import names
from config.database import make_engine
from config.settings import POOL_PRESETS, SAGA_JOINS, Settings
from orders.tables import customers, products
from sagas.canvas import dispatch_saga
from sagas.definition import SagaDefinition, Stage, Step
from scripts.services import LocalPostgres, LocalRedis
from tests.conftest import API_KEY, migrate, register_test_keys
from tests.harness.processes import Stack, WorkerSpec
from workers.celery_app import create_celery

#: PostgreSQL's I/O counters read around each level (Bench._storage), per operation:
#: shared-buffer misses (a page read from the OS) and hits, WAL bytes and full-page
#: images, pages a backend had to write out itself to free a buffer, and pages the
#: checkpointer and background writer wrote.
STORAGE_FIGURES = (
    "buffer misses",
    "buffer hits",
    "WAL bytes",
    "WAL full-page images",
    "backend page writes",
    "checkpointer and bgwriter page writes",
)

#: A statement that read pages in: pages read, ms spent, calls, its text.
Reader = tuple[float, float, int, str]

#: A rate is sustained when its p99 completion time stays under this.
SLO_SECONDS = 1.0
DEFAULT_RATES = (25, 50, 75, 100, 125, 150, 175, 200, 250, 300)
#: The bare chord: the saga's shape (two members, one body) with no work in it.
BARE_CHORD = SagaDefinition(
    name="bench",
    stages=(Stage((Step("a", names.BENCH_NOOP), Step("b", names.BENCH_NOOP))),),
    complete_task=names.BENCH_NOOP_DONE,
)
CUSTOMERS, PRODUCTS = 200, 200


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank), or NaN."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Level:
    """What one system did at one offered rate."""

    system: str
    rate: float
    duration: float
    offered: int
    completed: int
    errors: int
    #: Completion latency (publish or POST -> final), seconds.
    latencies: list[float]
    #: POST latency, seconds (sagas only).
    post_latencies: list[float] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    redis_commands: float = 0.0
    db_transactions: float = 0.0
    #: Database sessions opened per operation (connections made, then closed).
    db_sessions: float = 0.0
    #: With ``--profile``: the saga level's profile, as markdown (bench.profile).
    profile: str = ""
    #: PostgreSQL's I/O per operation (STORAGE_FIGURES), from its statistics views.
    storage: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Completions per second of the offered duration."""
        return self.completed / self.duration

    @property
    def sustained(self) -> bool:
        """Every operation finished and p99 stayed under the objective."""
        return self.completed == self.offered and quantile(self.latencies, 0.99) < SLO_SECONDS


class Processes:
    """CPU time and peak memory of the stack's processes, by group."""

    def __init__(self, base: Path) -> None:
        self.base = str(base)
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def groups(self) -> dict[str, list[psutil.Process]]:
        """The stack's processes: api, worker, events, beat, postgres, redis, and this one."""
        found: dict[str, list[psutil.Process]] = {}
        me = psutil.Process()
        procs = list(psutil.process_iter(["cmdline", "name", "ppid"]))
        parent = {proc.pid: proc.info["ppid"] for proc in procs}
        # Only this stack's processes (a shared machine runs other stacks): those this
        # process started, and PostgreSQL's, whose postmaster names the stack's directory.
        roots = {me.pid} | {p.pid for p in procs if self.base in " ".join(p.info["cmdline"] or [])}

        def ours(pid: int) -> bool:
            for _ in range(64):
                if pid in roots:
                    return True
                if pid not in parent or pid <= 1:
                    return False
                pid = parent[pid]
            return False

        for proc in procs:
            if not ours(proc.pid):
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            if "gunicorn" in cmd:
                group = "api"
            elif "celery" in cmd and " worker" in cmd:
                group = "worker"
            elif "celery" in cmd and " beat" in cmd:
                group = "beat"
            elif "workers.events" in cmd:
                group = "events"
            elif (proc.info["name"] or "").startswith("postgres"):
                group = "postgres"
            elif "redis-server" in (proc.info["name"] or ""):
                group = "redis"
            elif proc.pid == me.pid:
                group = "load generator"
            else:
                continue
            found.setdefault(group, []).append(proc)
        return found

    def cpu(self) -> dict[str, float]:
        """Seconds of CPU each group used so far."""
        used: dict[str, float] = {}
        for group, procs in self.groups().items():
            for proc in procs:
                try:
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                # The children's times hold those of processes that exited and were
                # reaped (a database connection closed by the pool, a recycled pool
                # child): without them their CPU would fall out of the figures.
                used[group] = used.get(group, 0.0) + (
                    times.user + times.system + times.children_user + times.children_system
                )
        return used

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            for group, procs in self.groups().items():
                rss = 0
                for proc in procs:
                    try:
                        rss += proc.memory_info().rss
                    except psutil.Error:
                        continue
                self.peak[group] = max(self.peak.get(group, 0.0), rss / 2**20)

    def reset_peaks(self) -> None:
        """Start a new peak-memory measurement."""
        self.peak = {}

    def start(self) -> None:
        """Start sampling memory."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()


class Bench:
    """The stack under test and the two loads."""

    def __init__(
        self,
        base: Path,
        worker_concurrency: int,
        events: bool,
        saga_join: str = "chord",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.base = base
        self.saga_join = saga_join
        #: More environment for the system's processes (bench.admission sets its bound).
        self.extra_env = extra_env or {}
        # pg_stat_statements: the history report names the statements that read pages in.
        self.postgres = LocalPostgres(
            base,
            fsync=True,
            options={
                "shared_preload_libraries": "pg_stat_statements",
                # Planning time per statement too, for --profile (what a cached plan would
                # save); on in every run, so that runs with and without it compare.
                "pg_stat_statements.track_planning": "on",
            },
        )
        self.redis = LocalRedis(base, password=secrets.token_hex(12), appendonly=True)
        self.worker_concurrency = worker_concurrency
        self.events = events
        self.processes = Processes(base)
        self.rng = random.Random(7)
        #: Set by ``--profile``: each saga level is sampled with py-spy.
        self.profile = False

    def start(self) -> None:
        """Servers, schema, data, then the system's processes."""
        self.postgres.start()
        self.redis.start()
        self.postgres.create_database("orders")
        migrate(self.postgres.url(role="owner"))
        self.settings = Settings(
            env="test",
            database_url=self.postgres.url(),
            db_pool=POOL_PRESETS["local"],
            broker_url=self.redis.url(0),
            result_backend_url=self.redis.url(1),
            cache_url=self.redis.url(2),
        )
        register_test_keys(self.settings, self.postgres.url(role="owner"))
        self.engine = make_engine(self.settings, application_name="bench")
        with self.engine.begin() as conn:
            conn.execute(
                insert(customers),
                [
                    {"id": f"C{n}", "name": "bench", "credit_limit": 10**10}
                    for n in range(CUSTOMERS)
                ],
            )
            conn.execute(
                insert(products),
                [
                    {"id": f"P{n}", "name": "bench", "unit_price": 1, "on_hand": 10**9}
                    for n in range(PRODUCTS)
                ],
            )
        self.stack = Stack(  # the processes of the Procfile, a worker per lane
            self.settings,
            self.base / "logs",
            beat=True,
            events=True,
            worker_specs=[
                WorkerSpec("worker-saga", "saga.high", self.worker_concurrency),
                WorkerSpec("worker-default", "default", 1),
                WorkerSpec("worker-batch", "batch.low", 1, nice=10),
                WorkerSpec("worker-housekeeping", "housekeeping", 1, nice=10),
            ],
            # The API sends sagas as SAGA_JOIN says; the bare chord is always a chord.
            # The housekeeping jobs' "succeeded in" lines are kept: the history report
            # reads their durations from them.
            extra_env={
                "BENCH_TASKS": "1",
                "SAGA_JOIN": self.saga_join,
                "LOG_QUIET_TASKS": "0",
                **self.extra_env,
            },
            worker_events=self.events,
        )
        self.stack.start()
        self.publisher = create_celery(self.settings, publisher=True)
        self.broker = Redis.from_url(self.settings.broker_url)
        self.processes.start()

    def stop(self) -> None:
        """Stop everything that was started."""
        self.processes.stop()
        if hasattr(self, "stack"):
            self.stack.stop()
        if hasattr(self, "engine"):
            self.engine.dispose()
        self.redis.stop()
        self.postgres.stop()

    def log_sizes(self) -> dict[Path, int]:
        """How far each worker's log has got (where a run's lines begin or end)."""
        return {path: path.stat().st_size for path in (self.base / "logs").glob("worker*.log")}

    def _counters(self) -> tuple[float, float, float]:
        """Redis commands, database transactions and database sessions opened so far."""
        commands = float(self.broker.info("stats")["total_commands_processed"])
        with self.engine.connect() as conn:
            xacts, sessions = conn.execute(
                text(
                    "SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database "
                    "WHERE datname = 'orders'"
                )
            ).one()
        return commands, float(xacts), float(sessions)

    def _statement_stats(self, query: str, **params: object) -> list[Any]:
        """Rows of pg_stat_statements (as the superuser, the extension made if missing)."""
        engine = create_engine(self.postgres.url(role="admin"))
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
                return list(conn.execute(text(query), params).all())
        finally:
            engine.dispose()

    def statements(self, *, reset: bool = False, top: int = 8) -> list[Reader]:
        """The statements that read the most pages into shared buffers since the last
        reset (pg_stat_statements): pages read, ms, calls, query. ``reset``: forget
        what was counted so far instead."""
        if reset:
            self._statement_stats("SELECT pg_stat_statements_reset()")
            return []
        rows = self._statement_stats(
            "SELECT shared_blks_read, total_exec_time, calls, query "
            "FROM pg_stat_statements ORDER BY shared_blks_read DESC LIMIT :n",
            n=top,
        )
        return [(float(r[0]), float(r[1]), int(r[2]), " ".join(r[3].split())) for r in rows]

    def redis_commands(self) -> dict[str, int]:
        """Redis's count of each command so far (INFO commandstats)."""
        stats = self.broker.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}

    def statement_times(self, done: int, top: int = 15) -> str:
        """Markdown: the statements that took PostgreSQL the most time since the last
        reset (pg_stat_statements), per operation: calls, planning and execution ms."""
        rows = self._statement_stats(
            "SELECT calls, total_plan_time, total_exec_time, query "
            "FROM pg_stat_statements WHERE dbid = "
            "(SELECT oid FROM pg_database WHERE datname = 'orders') "
            "ORDER BY total_plan_time + total_exec_time DESC"
        )
        n = max(1, done)
        calls = sum(r.calls for r in rows) / n
        plan = sum(r.total_plan_time for r in rows) / n
        run = sum(r.total_exec_time for r in rows) / n
        lines = [
            "### PostgreSQL statements (pg_stat_statements, per saga)",
            "",
            f"In all: {calls:.1f} statements, planning {plan:.2f} ms, execution {run:.2f} ms "
            "(wall time in the server, parsing and the protocol not included).",
            "",
            "| calls | planning ms | execution ms | statement |",
            "|---|---|---|---|",
        ]
        for row in rows[:top]:
            query = " ".join(row.query.split())
            query = query if len(query) <= 110 else query[:107] + "..."
            lines.append(
                f"| {row.calls / n:.2f} | {row.total_plan_time / n:.3f} "
                f"| {row.total_exec_time / n:.3f} | `{query.replace('|', '/')}` |"
            )
        return "\n".join(lines) + "\n"

    def _storage(self) -> dict[str, float]:
        """PostgreSQL's cumulative I/O counters: figures per saga that the machine's other
        work does not blur (unlike times), so that a cost growing with the history shows."""
        with self.engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT d.blks_read, d.blks_hit, w.wal_bytes, w.wal_fpi, "
                    "b.buffers_backend, b.buffers_checkpoint + b.buffers_clean "
                    "FROM pg_stat_database d, pg_stat_wal w, pg_stat_bgwriter b "
                    "WHERE d.datname = 'orders'"
                )
            ).one()
        return {name: float(value) for name, value in zip(STORAGE_FIGURES, row, strict=True)}

    def measure(
        self, system: str, rate: float, duration: float, drive: Callable[[float, float], Level]
    ) -> Level:
        """Run one level and attach its costs."""
        self.processes.reset_peaks()
        profiler = None
        if self.profile and system == "saga":
            profiler = Profiler(self.base / "profile" / f"{system}-{rate:g}")
            profiler.start(self.processes.groups(), duration)
            self.statements(reset=True)
            commands_before = self.redis_commands()
        storage_before = self._storage()
        cpu_before, (cmd_before, xact_before, sess_before) = (
            self.processes.cpu(),
            self._counters(),
        )
        level = drive(rate, duration)
        cpu_after, (cmd_after, xact_after, sess_after) = self.processes.cpu(), self._counters()
        storage_after = self._storage()
        done = max(1, level.completed)
        level.storage = {k: (storage_after[k] - storage_before[k]) / done for k in storage_after}
        level.cpu_ms = {g: (cpu_after[g] - cpu_before.get(g, 0.0)) * 1000 / done for g in cpu_after}
        if profiler is not None:
            level.profile = profile_report(profiler.stop(), level.cpu_ms)
            level.profile += "\n" + self.statement_times(level.completed)
            counts = self.redis_commands()
            per_op = {
                name: (calls - commands_before.get(name, 0)) / done
                for name, calls in counts.items()
            }
            level.profile += (
                "\n### Redis commands per saga (INFO commandstats)\n\n"
                + ", ".join(
                    f"{name} {n:.1f}"
                    for name, n in sorted(per_op.items(), key=lambda item: -item[1])
                    if n >= 0.05
                )
                + "\n"
            )
        level.peak_rss_mb = dict(self.processes.peak)
        level.redis_commands = (cmd_after - cmd_before) / done
        level.db_transactions = (xact_after - xact_before) / done
        level.db_sessions = (sess_after - sess_before) / done
        return level

    def bare_chords(self, rate: float, duration: float) -> Level:
        """Publish no-op chords at ``rate``; completion = the body's recorded time."""
        self.broker.delete("bench:done")
        count = int(rate * duration)
        published: dict[str, float] = {}
        start = time.monotonic() + 0.05
        wall = time.time() - time.monotonic()
        for n in range(count):
            due = start + n / rate
            time.sleep(max(0.0, due - time.monotonic()))
            chord_id = uuid.uuid4()
            published[str(chord_id)] = due + wall
            dispatch_saga(self.publisher, BARE_CHORD, chord_id, {}, join="chord")
        deadline = time.monotonic() + 10
        while self.broker.llen("bench:done") < count and time.monotonic() < deadline:
            time.sleep(0.1)
        finished = [entry.decode().split() for entry in self.broker.lrange("bench:done", 0, -1)]
        latencies = [float(t) - published[c] for c, t in finished if c in published]
        return Level("bare chord", rate, duration, count, len(latencies), 0, latencies)

    def sagas(self, rate: float, duration: float) -> Level:
        """POST orders at ``rate``; completion = the saga's own finish time."""
        since = time.time()
        host = "127.0.0.1"
        auth = {"Authorization": f"Bearer {API_KEY}"}

        def order(n: int) -> bytes:
            body = {
                "customer_id": f"C{self.rng.randrange(CUSTOMERS)}",
                "lines": [
                    {
                        "product_id": f"P{self.rng.randrange(PRODUCTS)}",
                        "quantity": self.rng.randint(1, 3),
                    }
                ],
            }
            return post_json(host, "/orders", body, auth)

        # Enough connections for latency spikes, few enough that each is used more often
        # than the server's keep-alive timeout (2 s) closes an idle one.
        connections = max(4, min(32, int(rate / 2)))
        samples = run_load(
            host, self.stack.api_port, order, rate=rate, duration=duration, connections=connections
        )
        accepted = [s for s in samples if s.status == 202]
        deadline = time.monotonic() + 10
        # Saga ids are time-ordered (config.ids): those made since the run began are a
        # range of the primary key, read without scanning a history of past sagas.
        lowest = uuid.UUID(int=int(since * 1000) << 80)
        query = text(
            "SELECT count(*) FILTER (WHERE finished_at IS NULL) AS busy, "
            "array_agg(extract(epoch FROM finished_at - created_at)) AS took "
            "FROM sagas WHERE id >= :lowest AND created_at >= to_timestamp(:since)"
        )
        while True:
            with self.engine.connect() as conn:
                row = conn.execute(query, {"since": since, "lowest": lowest}).one()
            if row.busy == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        latencies = [float(t) for t in (row.took or []) if t is not None]
        return Level(
            "saga",
            rate,
            duration,
            len(samples),
            len(latencies),
            len(samples) - len(accepted),
            latencies,
            post_latencies=[s.latency for s in samples],
        )


def climb(
    bench: Bench,
    systems: dict[str, Callable[[float, float], Level]],
    rates: list[float],
    duration: float,
    log: Callable[[str], None],
    refine: int = 0,
) -> dict[str, list[Level]]:
    """Offer each rate to each system in turn (so both are measured close in time on a
    machine whose speed drifts); a system leaves the ladder at its first rate not
    sustained. Then ``refine`` rounds of bisection between each system's highest
    sustained rate and the rate that failed above it, so that the highest sustained
    rate is known to a finer step than the ladder's. Levels come back by rate."""
    levels: dict[str, list[Level]] = {name: [] for name in systems}

    def measure(name: str, rate: float) -> None:
        level = bench.measure(name, rate, duration, systems[name])
        levels[name].append(level)
        log(
            f"  {name:<10} {rate:5.0f}/s offered: {level.throughput:6.1f}/s done, "
            f"p50 {quantile(level.latencies, 0.5) * 1000:7.1f} ms, "
            f"p99 {quantile(level.latencies, 0.99) * 1000:7.1f} ms, "
            f"CPU {sum(level.cpu_ms.values()):5.1f} ms/op ("
            + ", ".join(
                f"{group} {ms:.1f}"
                for group, ms in sorted(level.cpu_ms.items(), key=lambda item: -item[1])
            )
            + f"), {level.db_transactions:.2f} tx/op, {level.db_sessions:.3f} connections/op"
            + ("" if level.sustained else "  (not sustained)")
        )
        time.sleep(2)  # let the queues drain before the next level

    for rate in rates:
        for name in systems:
            if levels[name] and not levels[name][-1].sustained:
                continue
            measure(name, rate)
        if all(lv and not lv[-1].sustained for lv in levels.values()):
            break
    for _ in range(refine):
        for name in systems:
            if (between := _bracket(levels[name])) is not None:
                measure(name, between)
    return {name: sorted(found, key=lambda level: level.rate) for name, found in levels.items()}


def _bracket(levels: list[Level]) -> float | None:
    """The whole rate halfway between the highest sustained rate and the lowest rate
    above it that failed; None when there is no such pair or no whole rate between."""
    top = max((lv.rate for lv in levels if lv.sustained), default=None)
    if top is None:
        return None
    above = [lv.rate for lv in levels if not lv.sustained and lv.rate > top]
    if not above:
        return None
    middle = float(round((top + min(above)) / 2))
    return middle if top < middle < min(above) else None


def scaling_curve(
    concurrencies: list[int], rates: list[float], args: argparse.Namespace
) -> list[tuple[int, Level | None]]:
    """The order saga's ladder on a fresh stack per saga worker concurrency; prints one
    line per concurrency: its highest sustained rate and that level's costs."""
    curve: list[tuple[int, Level | None]] = []
    for concurrency in concurrencies:
        with tempfile.TemporaryDirectory(prefix="orders-bench-") as base:
            bench = Bench(
                Path(base), concurrency, events=not args.no_events, saga_join=args.saga_join
            )
            try:
                bench.start()
                print(f"scaling: saga worker -c {concurrency}", flush=True)
                load = psutil.getloadavg()[0]
                saga: dict[str, Callable[[float, float], Level]] = {"saga": bench.sagas}
                levels = climb(bench, saga, rates, args.duration, print)["saga"]
            finally:
                bench.stop()
        # The machine may be shared: its load says how far to trust the line.
        print(f"scaling: load average {load:.1f} before, {psutil.getloadavg()[0]:.1f} after")
        best = next((lv for lv in reversed(levels) if lv.sustained), None)
        curve.append((concurrency, best))
        if best is None:
            print(f"scaling: -c {concurrency}: no rate sustained", flush=True)
            continue
        cpu = ", ".join(f"{g} {ms:.2f}" for g, ms in sorted(best.cpu_ms.items()))
        rss = ", ".join(f"{g} {mb:.0f}" for g, mb in sorted(best.peak_rss_mb.items()))
        print(
            f"scaling: -c {concurrency}: sustained {best.rate:.0f}/s "
            f"(p50 {quantile(best.latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {quantile(best.latencies, 0.99) * 1000:.1f} ms); "
            f"CPU ms per saga {sum(best.cpu_ms.values()):.1f} ({cpu}); "
            f"Redis commands {best.redis_commands:.1f}, PG transactions "
            f"{best.db_transactions:.2f} per saga; peak MiB: {rss}",
            flush=True,
        )
    return curve


#: A worker's line for a task that finished: its name and how long it took.
_SUCCEEDED = re.compile(r"Task ([\w.]+)\[[^\]]+\] succeeded in ([0-9.eE+-]+)s")


def periodic_durations(before: dict[Path, int], after: dict[Path, int]) -> dict[str, list[float]]:
    """Seconds each run of a periodic job took between two points of the workers' logs
    (every task but the saga's own and the benchmark's no-ops)."""
    found: dict[str, list[float]] = {}
    for path, end in after.items():
        with path.open("rb") as log:
            log.seek(before.get(path, 0))
            chunk = log.read(end - before.get(path, 0)).decode(errors="replace")
        for task, seconds in _SUCCEEDED.findall(chunk):
            if not task.startswith(("saga.", "bench.")):
                found.setdefault(task, []).append(float(seconds))
    return found


@dataclass
class HistoryRun:
    """One run of the history comparison: the levels, the periodic jobs, the machine."""

    label: str
    levels: list[Level]
    periodic: dict[str, list[float]]
    #: The 1-minute load average before and after the run.
    load: tuple[float, float]
    #: The statements that read the most pages in during the run (Bench.statements).
    readers: list[Reader] = field(default_factory=list)


def measure_history_run(
    bench: Bench, label: str, rates: list[float], duration: float, log: Callable[[str], None]
) -> HistoryRun:
    """The saga load at each rate, and what the periodic jobs did meanwhile."""
    log(f"{label}:")
    load_before, logs_before = os.getloadavg()[0], bench.log_sizes()
    bench.statements(reset=True)
    systems: dict[str, Callable[[float, float], Level]] = {"saga": bench.sagas}
    levels = climb(bench, systems, rates, duration, log)["saga"]
    periodic = periodic_durations(logs_before, bench.log_sizes())
    run = HistoryRun(label, levels, periodic, (load_before, os.getloadavg()[0]))
    run.readers = bench.statements()
    return run


def history_report(
    out: Path, empty: HistoryRun, full: HistoryRun, loaded: Loaded, args: dict[str, object]
) -> str:
    """The two runs side by side (Markdown), written to ``out``/history.md."""

    def ms(values: list[float], q: float) -> str:
        return f"{quantile(values, q) * 1000:,.1f}"

    def ratio(a: list[float], b: list[float], q: float) -> str:
        base = quantile(a, q)
        return f"{quantile(b, q) / base:.2f}x" if base > 0 else "-"

    lines = [
        f"# Cost with history ({datetime.date.today().isoformat()})",
        "",
        f"{loaded.describe()}.",
        "",
        f"Arguments: {', '.join(f'{k}={v}' for k, v in sorted(args.items()))}; "
        f"{os.cpu_count()} CPUs; load average (1 min) before/after: "
        f"empty {empty.load[0]:.2f}/{empty.load[1]:.2f}, "
        f"history {full.load[0]:.2f}/{full.load[1]:.2f}.",
        "",
        "| rate | | empty | history | ratio |",
        "|---|---|---|---|---|",
    ]
    for a, b in zip(empty.levels, full.levels, strict=False):
        rows = (
            ("POST p50 ms", a.post_latencies, b.post_latencies, 0.5),
            ("POST p99 ms", a.post_latencies, b.post_latencies, 0.99),
            ("saga p50 ms", a.latencies, b.latencies, 0.5),
            ("saga p99 ms", a.latencies, b.latencies, 0.99),
        )
        for name, x, y, q in rows:
            lines.append(
                f"| {a.rate:.0f}/s | {name} | {ms(x, q)} | {ms(y, q)} | {ratio(x, y, q)} |"
            )
        lines.append(
            f"| {a.rate:.0f}/s | done / offered (errors) | {a.completed}/{a.offered} ({a.errors}) "
            f"| {b.completed}/{b.offered} ({b.errors}) | |"
        )
        for figure in STORAGE_FIGURES:
            x, y = a.storage.get(figure, 0.0), b.storage.get(figure, 0.0)
            lines.append(
                f"| {a.rate:.0f}/s | {figure} per saga | {x:,.1f} | {y:,.1f} "
                f"| {f'{y / x:.2f}x' if x else '-'} |"
            )
    lines += [
        "",
        'Periodic jobs during each run (the workers\' "succeeded in" lines): '
        "runs, median and longest seconds.",
        "",
        "| job | empty | history |",
        "|---|---|---|",
    ]

    def runs(durations: list[float]) -> str:
        if not durations:
            return "-"
        return f"{len(durations)} x, {quantile(durations, 0.5):.3f} / {max(durations):.3f} s"

    for task in sorted(set(empty.periodic) | set(full.periodic)):
        lines.append(
            f"| {task} | {runs(empty.periodic.get(task, []))} "
            f"| {runs(full.periodic.get(task, []))} |"
        )
    for run in (empty, full):
        lines += [
            "",
            f"Statements that read the most pages in, {run.label} (pg_stat_statements):",
            "",
            "| pages read | ms | calls | statement |",
            "|---|---|---|---|",
        ]
        for pages, ms_, calls, query in run.readers:
            shown = query if len(query) <= 160 else query[:157] + "..."
            lines.append(f"| {pages:,.0f} | {ms_:,.0f} | {calls:,} | `{shown.replace('|', '/')}` |")
    report = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.md").write_text(report)
    return report


#: The history run keeps all of its history (the loaded orders go 180 days back): the
#: retention job runs and finds nothing past its windows, as in a steady state where it
#: keeps up. Its catch-up on a history older than its windows is another measure.
HISTORY_KEPT = {
    f"RETAIN_{kind}_DAYS": "365" for kind in ("SAGAS", "EVENTS", "DEAD_LETTERS", "BATCH_RUNS")
} | {"RETAIN_IDEMPOTENCY_HOURS": str(365 * 24)}


def run_history(bench: Bench, args: argparse.Namespace, rates: list[float]) -> str:
    """The saga load on the empty database, the history, the same load again."""
    # A first load warms the stack up (pools, caches, imports): not measured.
    warm_up = min(15.0, args.duration)
    print(f"warming up: {rates[0]:.0f}/s for {warm_up:.0f} s (not measured)", flush=True)
    bench.sagas(rates[0], warm_up)
    time.sleep(2)
    empty = measure_history_run(bench, "empty database", rates, args.duration, print)
    print(f"loading {args.history:,} past orders...", flush=True)
    loaded = load_history(
        bench.postgres.url(role="owner"),
        args.history,
        customers=CUSTOMERS,
        products=PRODUCTS,
        admin_url=bench.postgres.url(role="admin"),
    )
    print(loaded.describe(), flush=True)
    full = measure_history_run(bench, f"{args.history:,} past orders", rates, args.duration, print)
    return history_report(args.out, empty, full, loaded, vars(args))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES))
    parser.add_argument(
        "--refine",
        type=int,
        default=2,
        metavar="N",
        help="after the ladder, N rounds of bisection between each system's highest "
        "sustained rate and the failed rate above it (0: the ladder's steps only)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=3,
        help="saga worker pool processes (the Procfile's SAGA_CONCURRENCY)",
    )
    parser.add_argument(
        "--scaling",
        metavar="C1,C2,...",
        help="measure the saga on a fresh stack per saga worker concurrency (e.g. 1,2,3) "
        "and print the highest sustained rate of each; writes no report",
    )
    parser.add_argument(
        "--no-events",
        action="store_true",
        help="run the worker without -E (no task events for Flower)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        metavar="N",
        help="measure the saga load on the empty database, then with N past orders loaded",
    )
    parser.add_argument("--only", choices=("bare", "saga"), help="measure one system only")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="more environment for the system's processes, to measure one setting against "
        "its default (repeatable; e.g. --env EVENTS_POLL_SECONDS=0.25)",
    )
    parser.add_argument(
        "--traces-file",
        type=Path,
        metavar="PATH",
        help="turn OpenTelemetry traces on in every process, exported to this file "
        "(TRACES_FILE), to measure what they cost",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the API, workers, beat and event consumers with py-spy during each "
        "saga level and add where their CPU goes (by package and function) to the report",
    )
    parser.add_argument(
        "--saga-join",
        choices=(*SAGA_JOINS, "both"),
        default=None,
        help="how the API joins a saga's steps (SAGA_JOIN); both (the default, but for "
        "--scaling and --history: chord): the chord's stack with the bare chord, then a "
        "stack with the database join, in one report",
    )
    args = parser.parse_args(argv)
    if args.saga_join is None:
        args.saga_join = "chord" if args.scaling or args.history else "both"
    rates = [float(r) for r in args.rates.split(",")]
    if args.scaling:
        if args.saga_join == "both":
            parser.error("--scaling measures one join: --saga-join chord or database")
        scaling_curve([int(c) for c in args.scaling.split(",")], rates, args)
        return 0
    if args.history:
        if args.saga_join == "both":
            parser.error("--history measures one join: --saga-join chord or database")
        return _history_main(args, rates)
    joins = ("chord", "database") if args.saga_join == "both" else (args.saga_join,)
    bare: list[Level] = []
    sagas: dict[str, list[Level]] = {}
    for n, join in enumerate(joins):
        # One stack per join (the API reads SAGA_JOIN when it starts); the bare chord is
        # measured on the first only: it is the same chord whatever the join.
        systems = ["saga"] if n else ["bare chord", "saga"]
        if args.only:
            systems = [name for name in systems if name.startswith(args.only)]
        if not systems:
            continue
        levels = _climb_on_stack(args, rates, join, systems)
        bare = bare or levels.get("bare chord", [])
        sagas[join] = levels.get("saga", [])
    first = sagas.get(joins[0], [])
    report = write_report(args.out, bare, first, SLO_SECONDS, {**vars(args), "saga_join": joins[0]})
    for join in joins[1:]:
        report += join_section(join, sagas.get(join, []), bare, SLO_SECONDS)
    for join, levels in sagas.items():
        profiled = [level for level in levels if level.profile]
        if profiled:
            # The highest sustained level's, or the first level's if none was sustained.
            chosen = next((lv for lv in reversed(profiled) if lv.sustained), profiled[0])
            title = f"## Profile of the saga joined by {join} at {chosen.rate:g}/s"
            report += f"\n{chosen.profile.replace('## Profile', title, 1)}"
    (args.out / "report.md").write_text(report)
    print(report)
    return 0


def _bench(base: Path, args: argparse.Namespace, join: str) -> Bench:
    bench = Bench(
        base,
        args.concurrency,
        events=not args.no_events,
        saga_join=join,
        extra_env={
            # Every periodic job runs during a history run, the credit check included.
            **({"CREDIT_CHECK_EVERY_SECONDS": "60", **HISTORY_KEPT} if args.history else {}),
            **({"TRACES_FILE": str(args.traces_file.resolve())} if args.traces_file else {}),
            **dict(_setting(pair) for pair in args.env),
        },
    )
    bench.profile = args.profile
    return bench


def _setting(pair: str) -> tuple[str, str]:
    name, sep, value = pair.partition("=")
    if not sep or not name.isidentifier():
        raise SystemExit(f"--env takes NAME=VALUE, not {pair!r}")
    return name, value


def _climb_on_stack(
    args: argparse.Namespace, rates: list[float], join: str, systems: list[str]
) -> dict[str, list[Level]]:
    """A fresh stack whose API joins sagas by ``join``, and the ladder on it."""
    with tempfile.TemporaryDirectory(prefix="orders-bench-") as base:
        bench = _bench(Path(base), args, join)
        try:
            bench.start()
            print(
                f"bench: {args.duration:.0f} s per rate, worker -c {args.concurrency}"
                f"{'' if args.no_events else ' -E'}, saga steps joined by {join}"
                + "".join(f", {pair}" for pair in args.env),
                flush=True,
            )
            drives = {"bare chord": bench.bare_chords, "saga": bench.sagas}
            # A fresh stack's first seconds are slower (connections, imports, PostgreSQL's
            # caches): each system warms up at the first rate, not measured.
            warm_up = min(10.0, args.duration)
            for system in systems:
                print(f"warming up: {system}, {rates[0]:.0f}/s for {warm_up:.0f} s", flush=True)
                drives[system](rates[0], warm_up)
                time.sleep(2)
            return climb(
                bench,
                {s: drives[s] for s in systems},
                rates,
                args.duration,
                print,
                refine=args.refine,
            )
        finally:
            bench.stop()


def _history_main(args: argparse.Namespace, rates: list[float]) -> int:
    with tempfile.TemporaryDirectory(prefix="orders-bench-") as base:
        bench = _bench(Path(base), args, args.saga_join)
        try:
            bench.start()
            print(run_history(bench, args, rates))
        finally:
            bench.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
