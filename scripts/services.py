"""Local PostgreSQL and Redis servers on 127.0.0.1, for ``make run`` and the tests.

Both run from the machine's binaries (Debian's ``redis-server``, PostgreSQL 15) in a
directory of our own. PostgreSQL refuses to run as root: as root, its commands run as
the ``postgres`` user. Standard library only.

PostgreSQL asks every connection for a password (scram-sha-256, over TCP and the unix
socket alike) and has three roles: ``postgres``, the superuser, for administration
only; ``orders``, which owns the databases and their schema and runs the migrations;
``orders_app``, which the system's processes use: it reads and writes rows, nothing
more (no DDL, no superuser, no CREATE on the schema).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PG_BIN_DIRS = (
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
)
#: The OS user that runs PostgreSQL when we are root.
PG_OS_USER = "postgres"
#: The database superuser created by initdb: administration only.
PG_SUPERUSER = "postgres"
#: The owner of the databases and their schema: the migrations run as this role.
PG_OWNER = "orders"
#: The role the system's processes connect as: rows only (SELECT, INSERT, UPDATE,
#: DELETE, its tables' sequences).
PG_APP_ROLE = "orders_app"
#: Which role :meth:`LocalPostgres.url` connects as.
Role = Literal["app", "owner", "admin"]


@dataclass(frozen=True)
class PgPasswords:
    """The password of each role."""

    admin: str
    owner: str
    app: str

    @classmethod
    def generate(cls) -> PgPasswords:
        """New random passwords."""
        return cls(*(secrets.token_urlsafe(24) for _ in range(3)))


def _literal(value: str) -> str:
    """``value`` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    path.chmod(0o600)


def private_dir(path: Path) -> None:
    """Make ``path`` a directory only we can enter; as root, the ``postgres`` user may
    pass through it (mode 710, group postgres) to reach its own directories."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(path, "root", PG_OS_USER)
        path.chmod(0o710)
    else:
        path.chmod(0o700)


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
    """A PostgreSQL cluster in ``base/pg``, listening on 127.0.0.1 only, every
    connection authenticated by password (scram-sha-256)."""

    def __init__(
        self,
        base: Path,
        port: int | None = None,
        *,
        fsync: bool = True,
        passwords: PgPasswords | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        self.base = base
        #: More server settings (``-c name=value``), e.g. the bench's preloaded libraries.
        self.options = dict(options or {})
        self.data = base / "pg"
        self.sockets = base / "pg-socket"
        self.log = base / "pg.log"
        self.port = port or free_port()
        self.fsync = fsync
        self.passwords = passwords or PgPasswords.generate()
        self.bin = pg_bin_dir()

    def url(self, database: str = "orders", *, role: Role = "app") -> str:
        """The SQLAlchemy URL of ``database`` as ``role``: ``app`` (the system's
        processes: rows only), ``owner`` (migrations) or ``admin`` (the superuser)."""
        user, password = self._credentials(role)
        return f"postgresql+psycopg2://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def _credentials(self, role: Role) -> tuple[str, str]:
        if role == "app":
            return PG_APP_ROLE, self.passwords.app
        if role == "owner":
            return PG_OWNER, self.passwords.owner
        return PG_SUPERUSER, self.passwords.admin

    def _run(
        self,
        *argv: str,
        check: bool = True,
        password: str | None = None,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", PG_OS_USER, "--", *command]
        # A password goes through the environment (only its user and root read a
        # process's environment), never the command line that `ps` shows everyone.
        env = {**os.environ, "PGPASSWORD": password} if password is not None else None
        return subprocess.run(
            command,
            check=check,
            capture_output=True,
            text=True,
            env=env,
            input=stdin,
            cwd=self.base if self.base.is_dir() else None,
        )

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(path, PG_OS_USER, PG_OS_USER)
        path.chmod(0o700)

    def _trusting(self) -> bool:
        """Whether the cluster lets connections in without a password (made by an
        older version of this file)."""
        hba = self.data / "pg_hba.conf"
        return hba.exists() and any(
            line.split()[-1] == "trust"
            for line in hba.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )

    def _initdb(self) -> None:
        self._own(self.data)
        pwfile = self.sockets / "initdb-password"  # in a directory only postgres enters
        private_file(pwfile, self.passwords.admin + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, PG_OS_USER, PG_OS_USER)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                PG_SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> None:
        """Create the cluster if needed and start it; return when it accepts
        connections and its roles are in place."""
        private_dir(self.base)
        self._own(self.sockets)
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        self.log.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(self.log, PG_OS_USER, PG_OS_USER)
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} "
            f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200 "
            "-c shared_buffers=128MB -c password_encryption=scram-sha-256 "
            "-c unix_socket_permissions=0700"
            + "".join(f" -c {name}={value}" for name, value in self.options.items())
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
        if self._trusting():
            self._stop_trusting()
        self._ensure_roles()

    def _stop_trusting(self) -> None:
        """Give a cluster that trusted everyone (its superuser was ``orders``) a
        superuser with a password, then ask a password of every connection."""
        admin, password = PG_SUPERUSER, _literal(self.passwords.admin)
        sql = (
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{admin}') "
            f"THEN CREATE ROLE {admin} SUPERUSER; END IF; END $$;\n"
            f"ALTER ROLE {admin} SUPERUSER LOGIN PASSWORD {password};\n"
        )
        self._psql_as(PG_OWNER, "", "postgres", sql)
        hba = self.data / "pg_hba.conf"
        lines = [
            re.sub(r"\btrust\s*$", "scram-sha-256", line)
            if line.strip() and not line.lstrip().startswith("#")
            else line
            for line in hba.read_text().splitlines()
        ]
        hba.write_text("\n".join(lines) + "\n")
        self._run("pg_ctl", "-D", str(self.data), "reload")

    def _ensure_roles(self) -> None:
        """The owner and the application's role, with their passwords (idempotent)."""
        sql = "".join(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') "
            f"THEN CREATE ROLE {name}; END IF; END $$;\n"
            f"ALTER ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
            f"NOBYPASSRLS PASSWORD {_literal(password)};\n"
            for name, password in (
                (PG_OWNER, self.passwords.owner),
                (PG_APP_ROLE, self.passwords.app),
            )
        )
        self.psql("postgres", sql)

    def create_database(self, name: str) -> None:
        """Create ``name`` unless it exists, owned by the owner; the application's role
        may connect and use its tables' rows (the migrations grant them), nobody else
        may connect or create anything in its schema."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain database name: {name!r}")
        # The name was checked above, so formatting it into SQL is safe.
        exists = self.psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{name}'")  # noqa: S608
        if exists.strip() != "1":
            self.psql("postgres", f'CREATE DATABASE "{name}" OWNER {PG_OWNER}')
        self.psql(
            name,
            f'ALTER DATABASE "{name}" OWNER TO {PG_OWNER};\n'
            f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC;\n'
            f'GRANT CONNECT ON DATABASE "{name}" TO {PG_APP_ROLE};\n'
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC;\n"
            f"GRANT USAGE ON SCHEMA public TO {PG_APP_ROLE};\n"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {PG_OWNER} IN SCHEMA public "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {PG_APP_ROLE};\n"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {PG_OWNER} IN SCHEMA public "
            f"GRANT USAGE, SELECT ON SEQUENCES TO {PG_APP_ROLE};\n",
        )

    def psql(self, database: str, sql: str, *, role: Role = "admin") -> str:
        """Run SQL through psql as ``role`` (the superuser unless told) and return its
        unaligned output. The SQL goes through psql's standard input: a password in it
        never shows on a command line."""
        user, password = self._credentials(role)
        return self._psql_as(user, password, database, sql)

    def _psql_as(self, user: str, password: str, database: str, sql: str) -> str:
        result = self._run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            user,
            "-d",
            database,
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            password=password,
            stdin=sql,
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
        replica_of: int | None = None,
    ) -> None:
        self.base = base
        self.dir = base / name
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        #: With a limit, the least recently used keys are evicted past it (a cache);
        #: without, nothing is ever evicted (a broker).
        self.maxmemory = maxmemory
        #: The port of the primary this server replicates (same password), if any.
        self.replica_of = replica_of
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """The redis:// URL of database ``db``."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start the server; return when it accepts connections."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found; run scripts/bootstrap.sh")
        # Its append-only file holds the messages (sagas' payloads): ours only.
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
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
            + (
                f"replicaof 127.0.0.1 {self.replica_of}\nmasterauth {self.password}\n"
                if self.replica_of
                else ""
            )
        )
        private_file(self.dir / "redis.conf", config)  # holds the password
        conf = self.dir / "redis.conf"
        self.process = subprocess.Popen([binary, str(conf)], start_new_session=True)
        wait_for_port(self.port, 20)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL: a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=20)
        self.process = None


class LocalSentinels:
    """Redis with failover on 127.0.0.1: a primary, a replica and three sentinels
    watching them as master ``master`` (quorum 2), every one with a password."""

    def __init__(
        self,
        base: Path,
        *,
        password: str,
        sentinel_password: str,
        master: str = "orders",
        down_after_ms: int = 1000,
    ) -> None:
        self.base = base
        self.password = password
        self.sentinel_password = sentinel_password
        self.master = master
        self.down_after_ms = down_after_ms
        self.primary = LocalRedis(base, password=password, name="redis-primary")
        self.replica = LocalRedis(
            base, password=password, name="redis-replica", replica_of=self.primary.port
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    def url(self, db: int = 0) -> str:
        """The kombu-style sentinel:// URL of database ``db`` on the master."""
        first, *rest = self.sentinel_ports
        return ";".join(
            [f"sentinel://:{self.password}@127.0.0.1:{first}/{db}"]
            + [f"sentinel://127.0.0.1:{port}/{db}" for port in rest]
        )

    def start(self) -> None:
        """Start the primary, the replica and the sentinels; return once the replica is
        in sync and every sentinel knows the others."""
        self.primary.start()
        self.replica.start()
        binary = shutil.which("redis-server")
        assert binary is not None
        for n, port in enumerate(self.sentinel_ports):
            directory = self.base / f"sentinel-{n}"
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o700)
            config = (
                f"port {port}\nbind 127.0.0.1\nprotected-mode yes\ndir {directory}\n"
                f"logfile sentinel.log\nrequirepass {self.sentinel_password}\n"
                f"sentinel monitor {self.master} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel auth-pass {self.master} {self.password}\n"
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master} 10000\n"
                f"sentinel parallel-syncs {self.master} 1\n"
            )
            # The sentinel rewrites its file (what it learns): ours only, writable.
            private_file(directory / "sentinel.conf", config)
            self.sentinels.append(
                subprocess.Popen(
                    [binary, str(directory / "sentinel.conf"), "--sentinel"],
                    start_new_session=True,
                )
            )
        for port in self.sentinel_ports:
            wait_for_port(port, 20)
        deadline = time.monotonic() + 30
        while not self._settled():
            if time.monotonic() > deadline:
                raise TimeoutError("the sentinels did not find each other and the replica")
            time.sleep(0.2)

    def _cli(self, port: int, password: str, *command: str) -> str:
        binary = shutil.which("redis-cli")
        if binary is None:
            raise FileNotFoundError("redis-cli not found; run scripts/bootstrap.sh")
        done = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port), *command],
            env={**os.environ, "REDISCLI_AUTH": password},  # never on the command line
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return done.stdout

    def _settled(self) -> bool:
        info = self._cli(self.primary.port, self.password, "info", "replication")
        if "state=online" not in info:
            return False
        for port in self.sentinel_ports:
            answer = self._cli(port, self.sentinel_password, "sentinel", "master", self.master)
            fields = answer.split()
            known = dict(zip(fields[::2], fields[1::2], strict=False))
            if known.get("num-other-sentinels") != "2" or known.get("num-slaves") != "1":
                return False
        return True

    def master_port(self) -> int | None:
        """The port of the master as the sentinels see it (None: none answers)."""
        for port in self.sentinel_ports:
            answer = self._cli(
                port, self.sentinel_password, "sentinel", "get-master-addr-by-name", self.master
            ).split()
            if len(answer) == 2 and answer[1].isdigit():
                return int(answer[1])
        return None

    def stop(self) -> None:
        """Stop every process of the group."""
        for process in self.sentinels:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)
        self.sentinels = []
        self.replica.stop()
        self.primary.stop()
