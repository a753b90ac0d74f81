"""Which metrics the processes export, read from their code, and which metrics a PromQL
expression names: the alert rules and the dashboard may only use the first.

The exported names come from the first argument of every prometheus_client metric and
metric family built in the system's packages, with the series names the text format
gives them (``_total`` of a counter, ``_bucket``/``_sum``/``_count`` of a histogram). A
static reading: a metric built from a computed name would be missed, and the check says
so by failing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The packages whose processes Prometheus scrapes.
PACKAGES = ("config", "orders", "sagas", "workers")
#: Series Prometheus makes itself for every target.
PROMETHEUS_OWN = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

#: Series names of each kind of metric, from its name.
_SERIES = {
    "Counter": ("_total",),
    "CounterMetricFamily": ("_total",),
    "Gauge": ("",),
    "GaugeMetricFamily": ("",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count"),
    "Summary": ("", "_sum", "_count"),
    "SummaryMetricFamily": ("", "_sum", "_count"),
    "Info": ("_info",),
    "InfoMetricFamily": ("_info",),
}


def exported_names() -> set[str]:
    """Every series name a process of the system can export."""
    names: set[str] = set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func
                kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                first = node.args[0]
                if kind not in _SERIES or not isinstance(first, ast.Constant):
                    continue
                if not isinstance(first.value, str):
                    continue
                base = first.value
                if kind.startswith("Counter"):
                    base = base.removesuffix("_total")
                names.update(base + suffix for suffix in _SERIES[kind])
    return names


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+")
#: A name, and the parenthesis that makes it a function's.
_IDENTIFIER = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan", "atan2"}
)


def names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label names, functions, keywords,
    strings and Grafana's variables left out)."""
    text = _VARIABLES.sub(" ", _STRINGS.sub('""', expr))
    for pattern in (_MATCHERS, _RANGES, _GROUPING):
        text = pattern.sub(" ", text)
    return {
        name
        for name, call in _IDENTIFIER.findall(text)
        if not call and name.lower() not in _KEYWORDS
    }
