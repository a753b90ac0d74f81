"""What the operators' command-line tools (``python -m workers.batch``, ``python -m
workers.dlq``) share: the settings ``make run`` wrote, and a plain message instead of a
traceback when something they need is missing.

``make run`` writes its settings to ``.run/env`` (in ``RUN_DIR``, by default the
repository's ``.run``). A tool reads the variables of that file its environment does not
set, so it reaches the system ``make run`` started; without the file, and with nothing
set, the defaults apply (PostgreSQL and Redis on their usual local ports).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

import redis
from kombu.exceptions import OperationalError as BrokerError
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import DBAPIError

from config.redis_client import connect
from config.settings import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a tool waits for PostgreSQL or Redis before saying it cannot reach them.
CONNECT_TIMEOUT = 3


class ToolError(Exception):
    """Something a tool needs is missing or unreachable; the message says what to do."""


def run_env_file(environ: MutableMapping[str, str] | None = None, name: str = "env") -> Path:
    """Where ``make run`` writes its settings (``owner.env``: the database URL of the
    schema's owner, for the tools that manage what the system may only read)."""
    env = os.environ if environ is None else environ
    return Path(env.get("RUN_DIR") or ROOT / ".run") / name


def load_run_env(environ: MutableMapping[str, str] | None = None, name: str = "env") -> list[str]:
    """Set the variables of ``.run/env`` that ``environ`` (``os.environ``) lacks; return
    their names (none when there is no such file, or when ``APP_ENV`` names another
    environment than ``make run``'s: a deployed system's settings are never mixed with a
    local run's)."""
    env = os.environ if environ is None else environ
    path = run_env_file(env, name)
    if not path.is_file() or env.get("APP_ENV", "local") != "local":
        return []
    loaded = []
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        name = name.strip()
        if sep and name and not name.startswith("#") and name not in env:
            env[name] = value
            loaded.append(name)
    return loaded


class ToolSettings:
    """A tool's settings, and where the ones it connects with came from (for messages)."""

    @classmethod
    def checked(cls, *, broker: bool, owner: bool = False) -> ToolSettings | None:
        """The settings, PostgreSQL (and the broker, if asked) found answering; None
        once what is missing has been said on standard error."""
        try:
            tool = cls(owner=owner)
            tool.require_database()
            if broker:
                tool.require_broker()
        except ToolError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return None
        return tool

    def __init__(
        self, environ: MutableMapping[str, str] | None = None, *, owner: bool = False
    ) -> None:
        env = os.environ if environ is None else environ
        self.env_file = run_env_file(env)
        # The owner's URL first: .run/env then fills in only what is still missing.
        owned = load_run_env(env, "owner.env") if owner else []
        self.from_file = set(owned) | set(load_run_env(env))
        self.given = {name for name in env if name not in self.from_file}
        try:
            self.settings: Settings = load_settings(env)
        except ConfigError as exc:
            raise ToolError(f"a setting is wrong: {exc}") from exc

    def origin(self, variable: str) -> str:
        """Where the value of ``variable`` came from."""
        if variable in self.from_file:
            return f"{variable} from {self.env_file}"
        if variable in self.given:
            return variable
        made = "" if self.env_file.is_file() else f", and there is no {self.env_file}"
        return f"the default: {variable} is not set{made}"

    def hint(self, variable: str) -> str:
        """What to do when the server named by ``variable`` does not answer."""
        if variable in self.from_file:
            return f"is `make run` running? ({self.env_file} is from its last start)"
        if variable in self.given:
            also = f", or unset it to use {self.env_file}" if self.env_file.is_file() else ""
            return f"check {variable} (server, port, password){also}"
        return f"start `make run` (it writes {self.env_file}), or set {variable}"

    def database_unreachable(self, exc: Exception) -> ToolError:
        """The message for a PostgreSQL that does not answer."""
        url = make_url(self.settings.database_url).render_as_string(hide_password=True)
        cause = _first_line(exc)
        return ToolError(
            f"PostgreSQL unreachable at {url} ({self.origin('DATABASE_URL')}): {cause}\n"
            f"  {self.hint('DATABASE_URL')}"
        )

    def broker_unreachable(self, exc: Exception) -> ToolError:
        """The message for a Redis broker that does not answer."""
        url = maybe_sanitize_url(self.settings.broker_url)
        return ToolError(
            f"Redis (the broker) unreachable at {url} ({self.origin('REDIS_URL')}):"
            f" {_first_line(exc)}\n  {self.hint('REDIS_URL')}"
        )

    def require_database(self) -> None:
        """Return when PostgreSQL answers and has the schema; ToolError otherwise."""
        engine = create_engine(
            self.settings.database_url, connect_args={"connect_timeout": CONNECT_TIMEOUT}
        )
        try:
            with engine.connect() as conn:
                migrated = conn.execute(text("SELECT to_regclass('alembic_version')")).scalar()
        except DBAPIError as exc:
            raise self.database_unreachable(exc) from exc
        finally:
            engine.dispose()
        if migrated is None:
            url = make_url(self.settings.database_url).render_as_string(hide_password=True)
            raise ToolError(
                f"the database at {url} has no schema: run `alembic upgrade head` (`make run` does)"
            )

    def require_broker(self) -> None:
        """Return when the broker's Redis answers; ToolError otherwise."""
        client = connect(
            self.settings.broker_url,
            self.settings.sentinel,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=CONNECT_TIMEOUT,
        )
        try:
            client.ping()
        except redis.RedisError as exc:
            raise self.broker_unreachable(exc) from exc
        finally:
            client.close()

    def explain(self, exc: Exception) -> ToolError | None:
        """A server lost while a command ran, as a message (None: not such an error)."""
        if isinstance(exc, DBAPIError) and (
            exc.connection_invalidated or "connect" in str(exc.orig).lower()
        ):
            return self.database_unreachable(exc)
        if isinstance(exc, BrokerError | redis.ConnectionError | redis.TimeoutError):
            return self.broker_unreachable(exc)
        return None

    def report(self, exc: Exception) -> int:
        """Say what a server lost while a command ran means, and return the exit status
        (1); any other error is raised again."""
        explained = self.explain(exc)
        if explained is None:
            raise exc
        print(f"error: {explained}", file=sys.stderr)
        return 1


def _first_line(exc: Exception) -> str:
    cause = getattr(exc, "orig", None) or exc
    if isinstance(cause, redis.AuthenticationError) or "authenticated" in str(cause):
        return "it refused us: the password in the URL is wrong or missing"
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__
