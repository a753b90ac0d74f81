"""The Grafana dashboard loads, shows what an operator needs, reads only metrics the
processes export, and is provisioned with Prometheus by docker-compose's monitoring
profile."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.unit.metric_names import PROMETHEUS_OWN, exported_names, names_in

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "config" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "orders.json"


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_the_dashboard_shows_throughput_latency_lanes_dead_letters_lag_and_caches() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    used: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            used |= names_in(target["expr"])
    assert {
        "orders_api_requests_total",  # throughput
        "orders_sagas_finished_total",
        "orders_saga_duration_seconds_bucket",  # saga latency
        "orders_queue_depth",  # lane backlogs
        "orders_dead_letters_open",
        "orders_consumer_lag_events",
        "orders_cache_requests_total",  # cache hit ratios
    } <= used


def test_every_query_of_the_dashboard_names_metrics_the_processes_export() -> None:
    exported = exported_names() | PROMETHEUS_OWN
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            used = names_in(target["expr"])
            assert used, (panel["title"], target["expr"])
            assert used <= exported, (panel["title"], used - exported)


def test_grafana_is_provisioned_with_the_prometheus_source_the_panels_name() -> None:
    sources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "orders.yml").read_text())
    (provider,) = providers["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    grafana = compose["grafana"]
    assert f"./config/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "./config/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


def test_monitoring_runs_only_with_its_profile_and_keeps_its_password_off_command_lines() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        assert (service.get("profiles") == ["monitoring"]) == (name in {"prometheus", "grafana"})
    assert "./config/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    # An empty password refuses to start, checked inside the container ($$: not by compose).
    (check,) = [part for part in grafana["entrypoint"] if "GF_SECURITY_ADMIN_PASSWORD" in part]
    assert '"$${GF_SECURITY_ADMIN_PASSWORD:?' in check
    assert not re.search(r"(?<!\$)\$\{?(GRAFANA_ADMIN_PASSWORD|GF_SECURITY_ADMIN_PASSWORD)", check)
    for port in (*services["prometheus"]["ports"], *grafana["ports"]):
        assert port.startswith("127.0.0.1:")
