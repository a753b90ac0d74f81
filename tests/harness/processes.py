"""The system's real processes (gunicorn, celery worker), started for end-to-end tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from config.redis_client import is_sentinel
from config.settings import Settings
from scripts.services import free_port
from tests.harness.client import Api

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class Service:
    """One long-running process in its own session, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process (its log is appended to)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group; SIGKILL it if it does not go in time."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash: nothing gets to clean up)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(15)

    def children(self) -> list[int]:
        """The process ids of the process's direct children (a worker's pool)."""
        if self.process is None:
            return []
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> None:
        """Wait until the log matches ``pattern``; fail early if the process died."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log()):
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.process.returncode}):\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no {pattern!r} after {timeout} s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.1)


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a process of the system reads its settings from."""
    env = {
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "APP_ENV": settings.env,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.broker_url,
        "RESULT_BACKEND_URL": settings.result_backend_url,
        "CACHE_URL": settings.cache_url or "off",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    if is_sentinel(settings.broker_url):
        env["REDIS_SENTINEL_MASTER"] = settings.redis_sentinel_master
        if settings.redis_sentinel_password:
            env["REDIS_SENTINEL_PASSWORD"] = settings.redis_sentinel_password
    env.update(extra)
    return env


@dataclass(frozen=True)
class WorkerSpec:
    """One worker node: its name, the queues it serves, its pool, its CPU priority."""

    name: str
    queues: str
    concurrency: int = 2
    nice: int = 0
    #: Settings of this node only (its WORKER_METRICS_PORT, say), over the stack's.
    env: tuple[tuple[str, str], ...] = ()


ALL_LANES = "saga.high,default,batch.low,housekeeping,webhooks"


@dataclass
class Stack:
    """The API under gunicorn, a saga worker and (optionally) beat, on the settings."""

    settings: Settings
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    worker_concurrency: int = 2
    #: Worker nodes serving every lane: "worker", then "worker-2", "worker-3"...
    workers: int = 1
    #: Or exactly these worker nodes (one per lane, as the Procfile runs them).
    worker_specs: list[WorkerSpec] | None = None
    #: Run workers with -E (task events, as Flower needs and the Procfile does).
    worker_events: bool = False
    beat: bool = False
    #: Run the event consumers' process (python -m workers.events).
    events: bool = False
    #: Start Flower with this "user:password" and URL prefix (workers then send events).
    flower_auth: str | None = None
    flower_prefix: str = ""
    flower_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    services: list[Service] = field(default_factory=list)
    clients: list[Api] = field(default_factory=list)

    def client(self) -> Api:
        """An API client, closed when the stack stops."""
        self.clients.append(Api(self.api_url))
        return self.clients[-1]

    def service(self, name: str) -> Service:
        """The running service called ``name``."""
        return next(s for s in self.services if s.name == name)

    @property
    def worker_nodes(self) -> list[Service]:
        """The worker services."""
        return [s for s in self.services if s.name.startswith("worker")]

    @property
    def api_url(self) -> str:
        """Where the API listens."""
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        """Start the worker and the API; return once both serve."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = process_env(self.settings, **self.extra_env)

        def service(name: str, command: str, **extra: str) -> Service:
            # Each process tree keeps its metrics apart, under the stack's directory.
            metrics = str(self.log_dir / f"metrics-{name}")
            own_env = {**env, "PROMETHEUS_MULTIPROC_DIR": metrics, **extra}
            program, *arguments = command.split()
            local = BIN / program
            executable = str(local) if local.exists() else shutil.which(program) or program
            arguments = [str(BIN / a) if a == "celery" else a for a in arguments]
            return Service(name, [executable, *arguments], own_env, self.log_dir)

        events = " -E" if self.worker_events or self.flower_auth else ""
        specs = self.worker_specs or [
            WorkerSpec("worker" if n == 1 else f"worker-{n}", ALL_LANES, self.worker_concurrency)
            for n in range(1, self.workers + 1)
        ]
        workers = [
            service(
                spec.name,
                (f"nice -n {spec.nice} " if spec.nice else "")
                + f"celery -A workers.app worker -P prefork -c {spec.concurrency} "
                f"-Q {spec.queues} -n {spec.name}-{self.api_port}@%h --without-mingle "
                f"--without-gossip -l INFO{events}",
                **dict(spec.env),
            )
            for spec in specs
        ]
        web = service(
            "web",
            "gunicorn -c python:config.gunicorn workers.web:create_app()",
            API_PORT=str(self.api_port),
            WEB_CONCURRENCY="2",
        )
        self.services = [*workers, web]
        if self.beat:
            schedule = self.log_dir / f"beat-schedule-{self.api_port}"
            self.services.append(
                service("beat", f"celery -A workers.app beat -s {schedule} -l INFO")
            )
        if self.events:
            self.services.append(service("events", "python -m workers.events"))
        if self.flower_auth:
            self.services.append(
                service(
                    "flower",
                    f"celery -A workers.app flower --address=127.0.0.1 --port={self.flower_port} "
                    f"--url_prefix={self.flower_prefix}",
                    FLOWER_BASIC_AUTH=self.flower_auth,  # never on its command line
                )
            )
        for service in self.services:
            service.start()
        self._wait_for_workers(workers)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API never became ready:\n{web.log()[-3000:]}")
            time.sleep(0.1)

    def _wait_for_workers(self, workers: list[Service], timeout: float = 60.0) -> None:
        """Wait until every worker answers a ping (whatever its log level)."""
        from workers.celery_app import create_celery

        app = create_celery(self.settings, publisher=True)
        names = {f"{worker.name}-{self.api_port}@{socket.gethostname()}" for worker in workers}
        deadline = time.monotonic() + timeout
        try:
            while True:
                answered = {name for reply in app.control.ping(timeout=0.5) for name in reply}
                if names <= answered:
                    return
                for worker in workers:
                    if worker.process is not None and worker.process.poll() is not None:
                        raise RuntimeError(f"{worker.name} exited:\n{worker.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers {names - answered} never answered a ping")
        finally:
            app.close()

    def stop(self) -> None:
        """Stop every process of the stack."""
        for client in self.clients:
            client.close()
        for service in reversed(self.services):
            service.stop()

    def logs(self, tail: int = 4000) -> str:
        """The end of each process's log, for a failing test's report."""
        return "\n".join(f"----- {s.name} -----\n{s.log()[-tail:]}" for s in self.services)
