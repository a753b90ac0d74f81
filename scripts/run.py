"""``make run``: the whole system on this machine with local defaults.

Starts PostgreSQL, Redis (the broker) and a second Redis for the caches on 127.0.0.1
(data in ``.run/``, or in ``RUN_DIR``), migrates the schema, seeds demo products and
customers, then runs the Procfile (API, a worker per lane, the event consumers, beat,
Flower) under ``scripts.supervise``: a process that exits is started again, with a
backoff, and the others go on. Ctrl-C (SIGINT) or SIGTERM stops every process, then
the servers.

Ports: PostgreSQL 5432, Redis 6379 and 6380, the API 8000, Flower 5555, the saga
worker's metrics 9808, or those named by PG_PORT, REDIS_PORT, CACHE_PORT, API_PORT,
FLOWER_PORT, SAGA_METRICS_PORT; any free port where that one is taken.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from scripts.services import LocalPostgres, LocalRedis, free_port, port_is_free
from scripts.supervise import Supervisor

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = Path(os.environ.get("RUN_DIR") or ROOT / ".run").resolve()
BIN = Path(sys.executable).parent


def _port(variable: str, default: int) -> int:
    """The port named by ``variable`` (else ``default``) when free, else any free one."""
    preferred = int(os.environ.get(variable) or default)
    return preferred if port_is_free(preferred) else free_port()


def _secrets() -> dict[str, str]:
    """Passwords and the API key, made once and kept in .run/secrets.json (mode 600)."""
    path = RUN_DIR / "secrets.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    made = {
        "redis_password": secrets.token_urlsafe(24),
        "api_key": secrets.token_urlsafe(24),
        "admin_key": secrets.token_urlsafe(24),
        "flower_password": secrets.token_urlsafe(12),
    }
    path.write_text(json.dumps(made))
    path.chmod(0o600)
    return made


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    """Start everything, keep the Procfile's processes running until Ctrl-C or SIGTERM,
    then stop them and the servers."""
    # Until the supervisor takes over, SIGTERM stops what was started, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGHUP, _interrupted)  # the terminal closed
    try:
        return _run()
    except KeyboardInterrupt:
        return 130


def _run() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    keys = _secrets()
    pg = LocalPostgres(RUN_DIR, _port("PG_PORT", 5432))
    redis = LocalRedis(
        RUN_DIR, _port("REDIS_PORT", 6379), password=keys["redis_password"], appendonly=True
    )
    # The caches' own Redis: bounded, least recently used keys evicted, nothing persisted.
    cache = LocalRedis(
        RUN_DIR,
        _port("CACHE_PORT", 6380),
        password=keys["redis_password"],
        name="cache",
        maxmemory="128mb",
    )
    api_port = _port("API_PORT", 8000)
    flower_port, metrics_port = _port("FLOWER_PORT", 5555), _port("SAGA_METRICS_PORT", 9808)
    env = {
        "APP_ENV": "local",
        "DATABASE_URL": pg.url(),
        "REDIS_URL": redis.url(0),
        "CACHE_URL": cache.url(0),
        "API_KEYS": keys["api_key"],
        "ADMIN_API_KEYS": keys.get("admin_key", secrets.token_urlsafe(24)),
        "API_PORT": str(api_port),
        "FLOWER_PORT": str(flower_port),
        "SAGA_METRICS_PORT": str(metrics_port),
        "FLOWER_BASIC_AUTH": f"admin:{keys['flower_password']}",
        "RUN_DIR": str(RUN_DIR),
    }
    env_file = RUN_DIR / "env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    env_file.chmod(0o600)
    process_env = {**os.environ, **env, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    try:
        pg.start()  # inside: a signal while it starts still stops it
        redis.start()
        cache.start()
        pg.create_database("orders")
        subprocess.run(
            [str(BIN / "alembic"), "upgrade", "head"], cwd=ROOT, env=process_env, check=True
        )
        subprocess.run(
            [str(BIN / "python"), "-m", "orders.demo"], cwd=ROOT, env=process_env, check=True
        )
        print(
            f"""
  API       http://127.0.0.1:{api_port}   (Authorization: Bearer {keys["api_key"]})
  Admin     /admin/dead-letters, /admin/batches/credit-check   (Bearer {env["ADMIN_API_KEYS"]})
  OpenAPI   http://127.0.0.1:{api_port}/openapi.json
  Flower    http://127.0.0.1:{flower_port}   (admin / {keys["flower_password"]})
  Postgres  {pg.url()}
  Settings  {env_file}

  Try:  curl -s -X POST http://127.0.0.1:{api_port}/orders \\
          -H 'Authorization: Bearer {keys["api_key"]}' -H 'Content-Type: application/json' \\
          -d '{{"customer_id": "ACME", "lines": [{{"product_id": "SKU-1001", "quantity": 2}}]}}'
""",
            flush=True,
        )
        # Each process runs in a session of its own: Ctrl-C reaches the supervisor
        # only, which stops them all (SIGTERM, then SIGKILL) before returning.
        supervisor = Supervisor.from_procfile(ROOT / "Procfile", env=process_env, cwd=ROOT)
        return supervisor.run()
    finally:
        # The servers go last, whatever signal comes meanwhile.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        cache.stop()
        redis.stop()
        pg.stop()
        print("make run: every process and server stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
