"""``make run`` keeps the system up when one of its processes exits: the supervisor
starts it again (with a backoff) and leaves the others alone; only SIGTERM or Ctrl-C
stops everything, and then nothing is left behind."""

from __future__ import annotations

import contextlib
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

from scripts.services import free_port, port_is_free
from tests.conftest import ROOT
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

#: The ports `make run` opens, each named by a variable.
PORTS = ("PG_PORT", "REDIS_PORT", "CACHE_PORT", "API_PORT", "FLOWER_PORT", "SAGA_METRICS_PORT")
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
