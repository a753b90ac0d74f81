"""Failpoints fire as armed, a counted number of times, and never in production."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_failpoint(name: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    code = f"from config.failpoints import failpoint; failpoint({name!r}); print('passed')"
    environ = {**os.environ, "FAILPOINTS_DIR": str(tmp_path), **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True
    )


def test_an_unarmed_failpoint_does_nothing(tmp_path: Path) -> None:
    assert run_failpoint("step.after_commit", tmp_path, FAILPOINTS="").stdout == "passed\n"


def test_an_armed_kill_kills_the_process(tmp_path: Path) -> None:
    result = run_failpoint("step.after_commit", tmp_path, FAILPOINTS="step.after_commit=kill")
    assert result.returncode == -9
    assert result.stdout == ""


def test_a_counted_failpoint_fires_that_many_times_across_processes(tmp_path: Path) -> None:
    armed = {"FAILPOINTS": "complete.before_commit=raise*2"}
    outcomes = [run_failpoint("complete.before_commit", tmp_path, **armed) for _ in range(3)]
    assert ["FailpointError" in o.stderr for o in outcomes] == [True, True, False]
    assert outcomes[2].stdout == "passed\n"


def test_failpoints_are_inert_in_production(tmp_path: Path) -> None:
    result = run_failpoint(
        "step.after_commit", tmp_path, FAILPOINTS="step.after_commit=kill", APP_ENV="production"
    )
    assert result.stdout == "passed\n"


def test_an_unknown_failpoint_is_refused(tmp_path: Path) -> None:
    result = run_failpoint("step.after_commit", tmp_path, FAILPOINTS="no.such.point=kill")
    assert result.returncode == 1
    assert "unknown failpoint 'no.such.point'" in result.stderr


def test_the_failpoints_in_the_code_are_exactly_the_declared_ones() -> None:
    from config.failpoints import KNOWN

    used = {
        match
        for package in ("orders", "sagas", "workers")
        for path in (ROOT / package).rglob("*.py")
        for match in re.findall(r'failpoint\("([a-z_.]+)"', path.read_text())
    }
    assert used == set(KNOWN)
