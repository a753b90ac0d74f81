"""``make run``: the whole system on this machine with local defaults.

Starts PostgreSQL, Redis (the broker) and a second Redis for the caches on 127.0.0.1
(data in ``.run/``, or in ``RUN_DIR``), migrates the schema, seeds demo products and
customers, then runs the Procfile (API, a worker per lane, the event consumers, beat,
Flower) under ``scripts.supervise``: a process that exits is started again, with a
backoff, and the others go on. Ctrl-C (SIGINT) or SIGTERM stops every process, then
the servers.

Ports: PostgreSQL 5432, Redis 6379 and 6380, the API 8000 (its metrics on /metrics),
Flower 5555, and the Prometheus metrics of every other process: the saga, default,
batch and housekeeping workers 9808 to 9811, the event consumers 9812, beat 9813, the
webhooks worker 9814; or those named by PG_PORT, REDIS_PORT, CACHE_PORT, API_PORT,
FLOWER_PORT and the METRICS_PORTS variables; any free port where that one is taken.
The banner lists them.

Nothing in ``.run`` is for other users: the directory is ours alone (as root: mode 710,
group postgres, so the PostgreSQL server can reach its own directories) and every
file in it is made private (umask 077). The passwords (PostgreSQL's three roles, the
two Redis servers, Flower) are kept in ``.run/secrets.json``, the demo API keys in
``.run/keys.json``, the processes' settings in ``.run/env``; none is printed. The
processes connect to PostgreSQL as ``orders_app`` (rows only); the migrations run as
``orders``, the schema's owner.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from scripts.services import (
    LocalPostgres,
    LocalRedis,
    PgPasswords,
    free_port,
    port_is_free,
    private_dir,
    private_file,
)
from scripts.supervise import Supervisor

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = Path(os.environ.get("RUN_DIR") or ROOT / ".run").resolve()
BIN = Path(sys.executable).parent


#: Each process's Prometheus port: the variable naming it (the Procfile hands a worker's
#: to it as WORKER_METRICS_PORT), its default, and what serves there.
METRICS_PORTS = (
    ("SAGA_METRICS_PORT", 9808, "saga worker"),
    ("DEFAULT_METRICS_PORT", 9809, "default worker"),
    ("BATCH_METRICS_PORT", 9810, "batch worker"),
    ("HOUSEKEEPING_METRICS_PORT", 9811, "housekeeping worker"),
    ("EVENTS_METRICS_PORT", 9812, "event consumers"),
    ("BEAT_METRICS_PORT", 9813, "beat"),
    ("WEBHOOKS_METRICS_PORT", 9814, "webhooks worker"),
)


def _port(variable: str, default: int) -> int:
    """The port named by ``variable`` (else ``default``) when free, else any free one."""
    preferred = int(os.environ.get(variable) or default)
    return preferred if port_is_free(preferred) else free_port()


#: What .run/secrets.json holds, each made when missing (a file of an older version
#: lacks some: they are added, and what it held and no longer means is dropped).
SECRETS = (
    "redis_password",  # the broker's
    "cache_password",
    "flower_password",
    "pg_admin_password",
    "pg_owner_password",
    "pg_app_password",
)


def _secrets() -> dict[str, str]:
    """The passwords, made once and kept in .run/secrets.json (mode 600)."""
    path = RUN_DIR / "secrets.json"
    held = dict(json.loads(path.read_text())) if path.exists() else {}
    kept = {name: held.get(name) or secrets.token_urlsafe(24) for name in SECRETS}
    if kept != held:
        private_file(path, json.dumps(kept, indent=2) + "\n")
    path.chmod(0o600)
    return kept


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
    # Whatever this process and its children create is theirs alone: the servers'
    # data and logs, the broker's append-only file (sagas' payloads), the keys file.
    os.umask(0o077)
    private_dir(RUN_DIR)
    keys = _secrets()
    pg = LocalPostgres(
        RUN_DIR,
        _port("PG_PORT", 5432),
        passwords=PgPasswords(
            admin=keys["pg_admin_password"],
            owner=keys["pg_owner_password"],
            app=keys["pg_app_password"],
        ),
    )
    redis = LocalRedis(
        RUN_DIR, _port("REDIS_PORT", 6379), password=keys["redis_password"], appendonly=True
    )
    # The caches' own Redis: bounded, least recently used keys evicted, nothing persisted.
    cache = LocalRedis(
        RUN_DIR,
        _port("CACHE_PORT", 6380),
        password=keys["cache_password"],
        name="cache",
        maxmemory="128mb",
    )
    api_port = _port("API_PORT", 8000)
    flower_port = _port("FLOWER_PORT", 5555)
    metrics = {variable: _port(variable, default) for variable, default, _ in METRICS_PORTS}
    env = {
        "APP_ENV": "local",
        "DATABASE_URL": pg.url(role="app"),
        "REDIS_URL": redis.url(0),
        "CACHE_URL": cache.url(0),
        "API_PORT": str(api_port),
        "FLOWER_PORT": str(flower_port),
        **{variable: str(port) for variable, port in metrics.items()},
        "FLOWER_BASIC_AUTH": f"admin:{keys['flower_password']}",
        "RUN_DIR": str(RUN_DIR),
    }
    env_file = RUN_DIR / "env"
    private_file(env_file, "".join(f"{name}={value}\n" for name, value in env.items()))
    # What `python -m orders.keys` connects with: the owner (the processes only read keys).
    private_file(RUN_DIR / "owner.env", f"DATABASE_URL={pg.url(role='owner')}\n")
    process_env = {**os.environ, **env, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    # Only the migrations connect as the schema's owner.
    migrate_env = {**process_env, "DATABASE_URL": pg.url(role="owner")}
    keys_file = RUN_DIR / "keys.json"
    try:
        pg.start()  # inside: a signal while it starts still stops it
        redis.start()
        cache.start()
        pg.create_database("orders")
        subprocess.run(
            [str(BIN / "alembic"), "upgrade", "head"], cwd=ROOT, env=migrate_env, check=True
        )
        subprocess.run(
            [str(BIN / "python"), "-m", "orders.demo"], cwd=ROOT, env=process_env, check=True
        )
        subprocess.run(
            [str(BIN / "python"), "-m", "orders.keys", "demo", "--out", str(keys_file)],
            cwd=ROOT,
            env=migrate_env,  # keys are the owner's to make: the system only reads them
            check=True,
        )
        secrets_file = RUN_DIR / "secrets.json"
        scraped = "\n".join(
            f"            {what:<20} http://127.0.0.1:{metrics[variable]}/metrics"
            for variable, _, what in METRICS_PORTS
        )
        print(
            f"""
  API       http://127.0.0.1:{api_port}   (API keys: {keys_file})
  Admin     /admin/dead-letters, /admin/batches/credit-check, /admin/credit-reviews
            (the "operator" key)
  OpenAPI   http://127.0.0.1:{api_port}/openapi.json
  Webhooks  POST /webhooks {{"url": "http://127.0.0.1:9000/hook"}}: final states, signed
  Flower    http://127.0.0.1:{flower_port}   (user admin; password in {secrets_file})
  Metrics   {"API":<20} http://127.0.0.1:{api_port}/metrics
{scraped}
  Postgres  127.0.0.1:{pg.port}/orders   (roles and passwords in {secrets_file})
  Settings  {env_file}

  Try:  KEY=$(python3 -c 'import json; print(json.load(open("{keys_file}"))["all_customers"])')
        curl -s -X POST http://127.0.0.1:{api_port}/orders \\
          -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
          -d '{{"customer_id": "ACME", "lines": [{{"product_id": "SKU-1001", "quantity": 2}}]}}'
        then, with the answer's order id: POST /orders/<id>/cancel (a pending order is
        cancelled, a confirmed one refunded), POST /orders/<id>/refund, and
        GET /orders/<id>/timeline for its sagas
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
