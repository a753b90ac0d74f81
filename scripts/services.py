"""Local PostgreSQL and Redis servers on 127.0.0.1, for ``make run`` and the tests.

Both run from the machine's binaries (Debian's ``redis-server``, PostgreSQL 15) in a
directory of our own. PostgreSQL refuses to run as root: as root, its commands run as
the ``postgres`` user. Standard library only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PG_BIN_DIRS = (
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
)
#: The OS user that runs PostgreSQL when we are root.
PG_OS_USER = "postgres"
#: The database superuser created by initdb (local trust authentication on 127.0.0.1).
PG_SUPERUSER = "orders"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def wait_for_port(port: int, timeout: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while port_is_free(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
        time.sleep(0.05)


def pg_bin_dir() -> Path:
    """The directory of the PostgreSQL server binaries."""
    for candidate in PG_BIN_DIRS:
        if (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    raise FileNotFoundError(
        "PostgreSQL server binaries not found; run scripts/bootstrap.sh (apt postgresql)"
    )


class LocalPostgres:
    """A PostgreSQL cluster in ``base/pg``, listening on 127.0.0.1 only."""

    def __init__(self, base: Path, port: int | None = None, *, fsync: bool = True) -> None:
        self.base = base
        self.data = base / "pg"
        self.sockets = base / "pg-socket"
        self.log = base / "pg.log"
        self.port = port or free_port()
        self.fsync = fsync
        self.bin = pg_bin_dir()

    def url(self, database: str = "orders") -> str:
        """The SQLAlchemy URL of ``database``."""
        return f"postgresql+psycopg2://{PG_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", PG_OS_USER, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True)

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(path, PG_OS_USER, PG_OS_USER)
            path.chmod(0o700)

    def start(self) -> None:
        """Create the cluster if needed and start it; return when it accepts connections."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # the postgres user must reach its directories
        self._own(self.sockets)
        if not (self.data / "PG_VERSION").exists():
            self._own(self.data)
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                PG_SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            )
        if os.geteuid() == 0:
            self.log.touch()
            shutil.chown(self.log, PG_OS_USER, PG_OS_USER)
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} "
            f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200 "
            "-c shared_buffers=128MB"
        )
        try:
            self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            )
        except subprocess.CalledProcessError as exc:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{tail}") from exc

    def create_database(self, name: str) -> None:
        """Create ``name`` unless it exists."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain database name: {name!r}")
        # The name was checked above, so formatting it into SQL is safe.
        exists = self.psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{name}'")  # noqa: S608
        if exists.strip() != "1":
            self.psql("postgres", f'CREATE DATABASE "{name}"')

    def psql(self, database: str, sql: str) -> str:
        """Run one SQL command through psql and return its unaligned output."""
        result = self._run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            PG_SUPERUSER,
            "-d",
            database,
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        )
        return result.stdout

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash: WAL recovery on the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def running(self) -> bool:
        """Whether the server runs."""
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0


class LocalRedis:
    """A redis-server in ``base/redis``, on 127.0.0.1 only, with a password."""

    def __init__(
        self,
        base: Path,
        port: int | None = None,
        *,
        password: str,
        appendonly: bool = False,
        name: str = "redis",
        maxmemory: str | None = None,
    ) -> None:
        self.base = base
        self.dir = base / name
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        #: With a limit, the least recently used keys are evicted past it (a cache);
        #: without, nothing is ever evicted (a broker).
        self.maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """The redis:// URL of database ``db``."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start the server; return when it accepts connections."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found; run scripts/bootstrap.sh")
        self.dir.mkdir(parents=True, exist_ok=True)
        config = (
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode yes\n"
            f'requirepass {self.password}\ndir {self.dir}\nsave ""\n'
            f"appendonly {'yes' if self.appendonly else 'no'}\n"
            + (
                f"maxmemory {self.maxmemory}\nmaxmemory-policy allkeys-lru\n"
                if self.maxmemory
                else "maxmemory-policy noeviction\n"
            )
            + "logfile redis.log\ndatabases 64\n"
        )
        conf = self.dir / "redis.conf"
        conf.write_text(config)
        conf.chmod(0o600)  # holds the password
        self.process = subprocess.Popen([binary, str(conf)], start_new_session=True)
        wait_for_port(self.port, 20)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL: a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=20)
        self.process = None
