"""``bench.run --profile`` shares a group's samples out by package and by function."""

from __future__ import annotations

from pathlib import Path

from bench.profile import package_of, report, summarise

SITE = "/w/.venv/lib/python3.11/site-packages"


def test_samples_are_summed_by_package_self_function_and_our_code(tmp_path: Path) -> None:
    raw = tmp_path / "worker-1.txt"
    raw.write_text(
        "process 1:celery;thread (0x1);run_step (/w/sagas/runner.py:90);"
        f"do_execute ({SITE}/sqlalchemy/engine/default.py:940) 30\n"
        "process 1:celery;thread (0x1);run_step (/w/sagas/runner.py:90);"
        "apply (/w/orders/saga.py:40);"
        f"send ({SITE}/redis/connection.py:500) 10\n"
        "process 1:celery;thread (0x1);"
        "emit (/usr/lib/python3.11/logging/__init__.py:1100) 10\n"
    )
    profile = summarise([raw, tmp_path / "missing.txt"])
    assert profile.samples == 50
    assert profile.by_package == {"sqlalchemy": 30, "redis": 10, "logging": 10}
    assert profile.self_time["sqlalchemy: do_execute"] == 30
    assert profile.ours_inclusive == {"runner.run_step": 40, "saga.apply": 10}
    text = report({"worker": profile}, {"worker": 20.0})
    assert "| sqlalchemy | 60.0% | 12.00 |" in text
    assert "| `runner.run_step` | 80.0% | 16.00 |" in text


def test_a_source_file_belongs_to_its_package() -> None:
    assert package_of(f"{SITE}/kombu/messaging.py") == "kombu"
    assert package_of(f"{SITE}/six.py") == "six"
    assert package_of("/w/workers/tasks.py") == "workers"
    assert package_of("/usr/lib/python3.11/json/decoder.py") == "json"
    # as py-spy writes them: relative to the sys.path entry the file was found under
    assert package_of("sqlalchemy/engine/default.py") == "sqlalchemy"
    assert package_of("threading.py") == "threading"
    assert package_of("sagas/runner.py") == "sagas"
