#!/usr/bin/env bash
# Installs what the project needs on Debian 12, and nothing more than is missing:
# redis-server, the PostgreSQL server and Chromium (apt), then a virtualenv in .venv with the
# project and its test tools (pip). Safe to run again; `make run` and `make test` do.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # renders the timeline page in a test
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then missing+=(postgresql-common); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]} (apt)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  apt() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 "$@"; }
  apt install -y -qq "${missing[@]}" || { apt update -qq && apt install -y -qq "${missing[@]}"; }
fi

stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
