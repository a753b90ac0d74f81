"""``make run`` keeps the system up when one of its processes exits: the supervisor
starts it again (with a backoff) and leaves the others alone; only SIGTERM or Ctrl-C
stops everything, and then nothing is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from scripts.run import METRICS_PORTS
from scripts.services import free_port, port_is_free
from tests.conftest import ROOT
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

#: The ports `make run` opens, each named by a variable.
PORTS = (
    *("PG_PORT", "REDIS_PORT", "CACHE_PORT", "API_PORT", "FLOWER_PORT"),
    *(variable for variable, _, _ in METRICS_PORTS),
)
STARTED = re.compile(r"\| (\w+) started \(pid=(\d+)")
EXITED = re.compile(r"\| (\w+) \(pid=(\d+)\) (.+?) after [\d.]+ s; restart \d+ in ([\d.]+) s")


class Supervised:
    """A supervising process in a session of its own, its output in a file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.seen: set[int] = set()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """Each program's latest process id, as the supervisor announced it."""
        latest = {name: int(pid) for name, pid in STARTED.findall(self.log())}
        self.seen |= set(latest.values())
        return latest

    def exits(self, name: str) -> list[tuple[str, float]]:
        """How each run of ``name`` ended, and the delay before its restart."""
        return [(how, float(delay)) for n, _, how, delay in EXITED.findall(self.log()) if n == name]

    def wait_for_programs(self, names: set[str], timeout: float) -> dict[str, int]:
        def all_started() -> dict[str, int] | None:
            assert self.process.poll() is None, self.log()[-3000:]
            pids = self.pids()
            return pids if names <= set(pids) else None

        return wait_for(f"{names} started", all_started, timeout=timeout)

    def wait_for_restart(self, name: str, old: int, timeout: float = 15) -> int:
        return wait_for(
            f"{name} restarted", lambda: (self.pids()[name] != old) and self.pids()[name], timeout
        )

    def terminate(self, timeout: float) -> int:
        """SIGTERM the supervisor (only it); return its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """Leave nothing behind whatever happened (the test's own cleanup)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        for pid in self.seen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def left_in_groups(groups: set[int]) -> list[str]:
    """Processes still in any of these process groups."""
    left = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(process.pid) in groups and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {' '.join(process.info['cmdline'] or [])}")
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return left


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    started: list[Supervised] = []

    def start(argv: list[str], *options: str, **env: str) -> Supervised:
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        log = tmp_path / f"supervisor-{len(started)}.log"
        started.append(Supervised([*argv, *options], log, environ))
        return started[-1]

    yield start
    for each in started:
        each.kill()


def test_a_killed_process_is_back_under_a_new_pid_and_the_others_keep_theirs(
    supervised: Callable[..., Supervised], tmp_path: Path
) -> None:
    port = free_port()
    (tmp_path / "Procfile").write_text(
        f"web: exec {sys.executable} -m http.server {port} --bind 127.0.0.1\n"
        "ticker: while true; do echo tick; sleep 0.2; done\n"
        "sleeper: exec sleep 600\n"
    )
    supervisor = supervised(
        [sys.executable, "-m", "scripts.supervise", "-f", str(tmp_path / "Procfile")]
    )
    before = supervisor.wait_for_programs({"web", "ticker", "sleeper"}, timeout=30)
    url = f"http://127.0.0.1:{port}/"
    wait_for("the web server", lambda: answers(url))
    assert re.search(r"ticker +\| tick", supervisor.log())  # output behind its name

    os.kill(before["web"], signal.SIGKILL)
    restarted = supervisor.wait_for_restart("web", before["web"])
    assert supervisor.exits("web") == [("was killed by SIGKILL", 1.0)]
    wait_for("the web server again", lambda: answers(url), timeout=15)
    after = supervisor.pids()
    assert after == {**before, "web": restarted}
    assert all(alive(pid) for pid in after.values())

    # The ticker's shell dies; its sleep (left in its group) goes with it.
    os.kill(before["ticker"], signal.SIGKILL)
    supervisor.wait_for_restart("ticker", before["ticker"])
    assert not left_in_groups({before["ticker"]})

    assert supervisor.terminate(timeout=30) == 0
    assert "SIGTERM received: stopping every process" in supervisor.log()
    assert not [pid for pid in supervisor.seen if alive(pid)]
    assert not left_in_groups(supervisor.seen)
    assert port_is_free(port)


def test_a_process_that_keeps_exiting_waits_longer_each_time_until_it_stays_up(
    supervised: Callable[..., Supervised], tmp_path: Path
) -> None:
    (tmp_path / "Procfile").write_text(
        "quick: echo starting; exit 3\nsteady: sleep 1.2; exit 1\nsleeper: exec sleep 600\n"
    )
    supervisor = supervised(
        [sys.executable, "-m", "scripts.supervise", "-f", str(tmp_path / "Procfile")],
        "--backoff=0.2",
        "--backoff-max=0.8",
        "--stable-after=1",
    )
    wait_for("five quick exits", lambda: len(supervisor.exits("quick")) >= 5, timeout=30)
    wait_for("three steady exits", lambda: len(supervisor.exits("steady")) >= 3, timeout=30)
    quick = supervisor.exits("quick")[:5]
    assert quick == [("exited with code 3", d) for d in (0.2, 0.4, 0.8, 0.8, 0.8)]
    # Up longer than --stable-after each time: it never waits more than the first delay.
    assert {delay for _, delay in supervisor.exits("steady")} == {0.2}
    assert re.search(r"quick +\| starting", supervisor.log())
    sleeper = supervisor.pids()["sleeper"]
    assert supervisor.terminate(timeout=30) == 0
    assert not alive(sleeper)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A RUN_DIR the postgres user can reach (pytest's own are private to us)."""
    path = Path(tempfile.mkdtemp(prefix="orders-make-run-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_make_run_stays_up_while_its_processes_are_killed_and_stops_clean_on_sigterm(
    supervised: Callable[..., Supervised], run_dir: Path
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_URL")}
    # Ports of its own: a `make run` of someone's keeps the usual ones.
    ports = {name: str(free_port()) for name in PORTS}
    supervisor = supervised(
        [sys.executable, "-m", "scripts.run"],
        **{**clean, "RUN_DIR": str(run_dir), "LOG_LEVEL": "WARNING"},
        **ports,
    )
    procfile = {"web", "worker_saga", "worker_default", "worker_batch", "events", "beat", "flower"}
    before = supervisor.wait_for_programs(procfile, timeout=120)
    env = dict(
        line.split("=", 1) for line in (run_dir / "env").read_text().splitlines() if "=" in line
    )
    assert env["API_PORT"] == ports["API_PORT"]
    health = f"http://127.0.0.1:{env['API_PORT']}/healthz"
    wait_for("the API", lambda: answers(health), timeout=60)
    # Every process serves its metrics where the banner says.
    for variable, _, what in METRICS_PORTS:
        url = f"http://127.0.0.1:{env[variable]}/metrics"
        assert url in supervisor.log(), what
        wait_for(f"the {what}'s metrics", lambda url=url: answers(url), timeout=60)
    servers = [int(env["DATABASE_URL"].rsplit(":", 1)[1].split("/")[0])] + [
        int(env[name].rsplit(":", 1)[1].split("/")[0]) for name in ("REDIS_URL", "CACHE_URL")
    ]

    for name in ("worker_default", "beat"):
        os.kill(before[name], signal.SIGKILL)
        supervisor.wait_for_restart(name, before[name])
        assert answers(health)  # the API never went away
    after = supervisor.pids()
    unchanged = procfile - {"worker_default", "beat"}
    assert {n: after[n] for n in unchanged} == {n: before[n] for n in unchanged}
    assert all(alive(after[name]) for name in procfile)
    assert supervisor.exits("worker_default") == [("was killed by SIGKILL", 1.0)]

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # still up a little later: nothing stopped the rest
        assert answers(health)
        time.sleep(0.5)
    assert all(alive(after[name]) for name in procfile)

    assert supervisor.terminate(timeout=90) == 0
    assert not [pid for pid in supervisor.seen if alive(pid)]
    assert not left_in_groups(supervisor.seen)
    assert all(port_is_free(port) for port in servers), servers
    assert "every process and server stopped" in supervisor.log()


def test_compose_restarts_every_long_running_service() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    restart = {name: service.get("restart") for name, service in services.items()}
    assert restart.pop("migrate") == "no"  # one shot
    assert set(restart.values()) == {"unless-stopped"}, restart


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command as another local user (``nobody``), with no password around."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(
        [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "nobody", "--", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=30,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="another local user needs root (runuser)")
def test_make_run_keeps_its_database_files_and_secrets_from_other_local_users(
    supervised: Callable[..., Supervised], run_dir: Path
) -> None:
    # A .run/secrets.json of an older version: its Redis password is kept, the
    # passwords it lacks are made, its API keys (now in the database) are dropped.
    (run_dir / "secrets.json").write_text(
        '{"redis_password": "older-redis-password", "api_key": "older-api-key",'
        ' "admin_key": "older-admin-key", "flower_password": "older-flower"}'
    )
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_URL")}
    ports = {name: str(free_port()) for name in PORTS}
    supervisor = supervised(
        [sys.executable, "-m", "scripts.run"],
        **{**clean, "RUN_DIR": str(run_dir), "LOG_LEVEL": "WARNING"},
        **ports,
    )
    procfile = {"web", "worker_saga", "worker_default", "worker_batch", "events", "beat", "flower"}
    supervisor.wait_for_programs(procfile, timeout=120)
    env = dict(
        line.split("=", 1) for line in (run_dir / "env").read_text().splitlines() if "=" in line
    )
    wait_for("the API", lambda: answers(f"http://127.0.0.1:{env['API_PORT']}/healthz"), timeout=60)
    held = json.loads((run_dir / "secrets.json").read_text())
    assert held["redis_password"] == "older-redis-password"
    assert "api_key" not in held and "admin_key" not in held
    assert held["cache_password"] != held["redis_password"]  # a password per Redis
    keys = json.loads((run_dir / "keys.json").read_text())
    every_secret = [
        *held.values(),
        keys["all_customers"],
        keys["operator"],
        *keys["customers"].values(),
    ]

    # The processes are the application's role; the owner's password is not theirs.
    assert env["DATABASE_URL"].startswith("postgresql+psycopg2://orders_app:")
    assert held["pg_owner_password"] not in (run_dir / "env").read_text()
    assert "API_KEYS" not in env and "ADMIN_API_KEYS" not in env
    # The demo keys are in the database: the operator's opens the operators' endpoints.
    api = f"http://127.0.0.1:{env['API_PORT']}"
    bearer = {"Authorization": f"Bearer {keys['operator']}"}
    assert httpx.get(f"{api}/admin/dead-letters", headers=bearer, timeout=10).status_code == 200
    assert httpx.get(f"{api}/admin/dead-letters", timeout=10).status_code == 401
    # A demo customer's key reads its own credit and nobody else's; the all-customers
    # key reads every one's.
    assert set(keys["customers"]) == {"ACME", "GLOBEX", "INITECH"}
    acme = {"Authorization": f"Bearer {keys['customers']['ACME']}"}
    every = {"Authorization": f"Bearer {keys['all_customers']}"}
    for customer in ("ACME", "GLOBEX"):
        path = f"{api}/customers/{customer}/credit"
        own = httpx.get(path, headers=acme, timeout=10).status_code
        assert own == (200 if customer == "ACME" else 404)
        assert httpx.get(path, headers=every, timeout=10).status_code == 200
    assert httpx.get(f"{api}/admin/dead-letters", headers=every, timeout=10).status_code == 403

    # No secret on any command line (`ps` shows them to everyone), nor in the log.
    for process in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        assert not [s for s in every_secret if s in line], (process.info["pid"], line[:200])
    flower = psutil.Process(supervisor.pids()["flower"])
    assert "FLOWER_BASIC_AUTH" in flower.environ()
    assert not [s for s in every_secret if s in supervisor.log()]
    assert str(run_dir / "secrets.json") in supervisor.log()  # where they are, instead

    # The directory is ours (and the postgres user's to pass through), nothing in it
    # anyone else's to read.
    mode = run_dir.stat().st_mode & 0o777
    assert mode == 0o710 and run_dir.group() == "postgres", oct(mode)
    for path in run_dir.rglob("*"):
        assert not path.lstat().st_mode & 0o007, (path, oct(path.lstat().st_mode))
        if path.owner() == "root" and not path.is_dir():
            assert not path.lstat().st_mode & 0o077, (path, oct(path.lstat().st_mode))
    aof = next((run_dir / "redis").rglob("appendonly*.aof*"))
    for path in (run_dir, run_dir / "pg-socket"):
        assert as_nobody("ls", str(path)).returncode != 0, path
    for path in (
        run_dir / "secrets.json",
        run_dir / "keys.json",
        run_dir / "env",
        run_dir / "pg.log",
        run_dir / "redis" / "redis.log",
        aof,
    ):
        result = as_nobody("cat", str(path))
        assert result.returncode != 0 and "Permission denied" in result.stderr, path

    # PostgreSQL asks everyone for a password: over TCP and through its socket.
    pg_port = env["DATABASE_URL"].rsplit(":", 1)[1].split("/")[0]
    for user in ("orders", "orders_app", "postgres"):
        for host in ("127.0.0.1", str(run_dir / "pg-socket")):
            result = as_nobody(
                "psql", "-h", host, "-p", pg_port, "-U", user, "-d", "orders", "-w",
                "-c", "COPY (SELECT 1) TO PROGRAM 'id'",
            )  # fmt: skip
            assert result.returncode != 0, (user, host, result.stdout)
            assert "password" in result.stderr or "Permission denied" in result.stderr, (
                result.stderr
            )

    assert supervisor.terminate(timeout=90) == 0
