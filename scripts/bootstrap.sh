#!/usr/bin/env bash
# Installs what the project needs on Debian 12, and nothing more than is missing:
# redis-server, the PostgreSQL server, Chromium and promtool (apt), then a virtualenv in
# .venv with the project and its test tools (pip). Safe to run again; `make run` and
# `make test` do.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # renders the timeline page in a test
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then missing+=(postgresql-common); fi
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
apt() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 "$@"; }
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]} (apt)"
  apt install -y -qq "${missing[@]}" || { apt update -qq && apt install -y -qq "${missing[@]}"; }
fi
# promtool (tests the alert rules) comes with Debian's prometheus package. Its server is
# not wanted: nothing recommended (the node exporter), not started while installing (a
# policy-rc.d that says no where the machine has none: without it, a container without
# systemd would run the init script), not left enabled under systemd.
if ! command -v promtool >/dev/null 2>&1; then
  echo "bootstrap: installing prometheus (apt), for promtool"
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    trap '$sudo rm -f "$policy"' EXIT
  fi
  promtool=(install -y -qq --no-install-recommends prometheus)
  apt "${promtool[@]}" || { apt update -qq && apt "${promtool[@]}"; }
  if [ -d /run/systemd/system ]; then $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
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
