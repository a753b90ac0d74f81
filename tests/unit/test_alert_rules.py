"""The alert rules (config/prometheus/alerts.yml) are valid, tested case by case with
promtool, runbooked in docs/operations.md, and read only metrics the processes export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.unit.metric_names import PROMETHEUS_OWN, exported_names, names_in

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "config" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
RUNBOOKS = ROOT / "docs" / "operations.md"
SEVERITIES = {"critical", "warning"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool (Debian's prometheus package; scripts/bootstrap.sh installs it)."""
    binary = shutil.which("promtool") or "/usr/bin/promtool"
    assert Path(binary).exists(), "promtool is missing: run scripts/bootstrap.sh"
    return subprocess.run(
        [binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page."""
    found = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_promtool_finds_the_rules_valid() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_every_alert_fires_and_stays_silent_as_its_promtool_cases_expect() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_prometheus_configuration_loads_and_evaluates_the_rules() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"orders-web", "orders-workers", "orders-events", "orders-beat"}


def test_prometheus_scrapes_every_process_that_compose_gives_a_metrics_port() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    ports = {
        (name, int(environment[variable]))
        for name, service in services.items()
        if isinstance(environment := service.get("environment", {}), dict)
        for variable in (
            "API_PORT",
            "WORKER_METRICS_PORT",
            "EVENTS_METRICS_PORT",
            "BEAT_METRICS_PORT",
        )
        if variable in environment
    }
    assert ("web", 8000) in ports and ("worker-saga", 9808) in ports
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    scraped = {
        (name, discovery["port"])
        for job in config["scrape_configs"]
        for discovery in job["dns_sd_configs"]
        for name in discovery["names"]
    }
    assert ports - scraped == set()


def test_each_alert_has_a_case_that_fires_and_one_that_stays_silent() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        checks: dict[str, list[bool]] = {}
        for check in case.get("alert_rule_test", []):
            checks.setdefault(check["alertname"], []).append(bool(check["exp_alerts"]))
        for name, firing in checks.items():
            if any(firing):
                fired.add(name)
            else:
                silent.add(name)
    names = {rule["alert"] for rule in alerts()}
    assert names - fired == set(), "no case shows these firing"
    assert names - silent == set(), "no case shows these silent"


def test_each_alert_waits_has_a_severity_says_what_it_means_and_links_its_runbook() -> None:
    sections = anchors(RUNBOOKS.read_text())
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in sections, f"docs/operations.md has no section {name}"


def test_the_rules_read_only_metrics_the_processes_export() -> None:
    exported = exported_names() | PROMETHEUS_OWN
    for rule in alerts():
        used = names_in(rule["expr"])
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)
