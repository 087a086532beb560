"""deploy/prometheus and deploy/grafana: configs and rules pass promtool, the alert rules behave as their unit
tests say, every PromQL expression (rules and dashboard) parses and names only metrics this code exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumers.runtime.telemetry import ServingMetrics, TrainerMetrics

pytestmark = pytest.mark.unit
yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deploy files (pip install pyyaml)")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "crossdistil.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install Debian's 'prometheus' package (deploy/setup.sh does)"
)
# Grafana template variables, replaced by something PromQL accepts so the expressions can be parsed.
GRAFANA_VARIABLES = {"$task": ".+", "$role": ".+", "$__rate_interval": "5m", "$__interval": "1m"}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def rule_expressions() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]
    out = []
    for expr in exprs:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
        out.append(expr)
    return out


@needs_promtool
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.compose.yml"])
def test_prometheus_configs_pass_promtool_check_config(config: str) -> None:
    result = promtool("check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_severity_and_annotations() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    assert {"CrossdistilAucDrop", "CrossdistilDriftDetected", "CrossdistilNoCheckpointPublished",
            "CrossdistilConsumerLagGrowing", "CrossdistilDeadLetterRate"} <= {rule["alert"] for rule in alerts}
    for rule in alerts:
        assert rule["alert"] in tested, f"{rule['alert']} has no promtool unit test"
        assert rule["labels"]["severity"] in {"page", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@needs_promtool
def test_every_dashboard_and_rule_expression_parses(tmp_path: Path) -> None:
    expressions = dashboard_expressions() + rule_expressions()
    rules = {"groups": [{"name": "parse", "rules": [
        {"record": f"crossdistil_parse_check_{i}", "expr": expr} for i, expr in enumerate(expressions)]}]}
    path = tmp_path / "parse.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


def exported_names() -> set[str]:
    """Every sample name a busy trainer and serving daemon export (histogram _bucket/_sum/_count included)."""
    registry = CollectorRegistry()
    metrics = TrainerMetrics(["click"], windows=(10_000,), registry=registry)
    y = np.array([0, 1] * 50)
    metrics.observe({"click": y}, {"click": np.where(y == 1, 0.7, 0.2)}, users=np.arange(100) % 7)
    metrics.mark_published_reference()
    metrics.consumer_lag({("impressions", 0): 1})
    metrics.dead_letter("empty")
    metrics.events_consumed("impressions", 1)
    metrics.batch_trained(1, 0.1)
    metrics.record_learner({"gate/click": 1.0, "teacher_auc/click": 0.7, "student_auc/click": 0.6})  # trust gate
    metrics.checkpoint_written(0.1)
    metrics.published(1, 0.1, 1.0)
    serving = ServingMetrics(registry)
    serving.request("/score", 0.01)
    serving.reload_failed("x")
    text = generate_latest(registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_expressions_name_only_metrics_that_are_exported() -> None:
    exported = exported_names() | {"up"}
    for expr in dashboard_expressions() + rule_expressions():
        for name in re.findall(r"\b(crossdistil_[a-z0-9_]+|up)\b", expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported by consumers.runtime.telemetry"


def test_dashboard_shows_the_panels_on_call_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("auc per task", "auc drift", "drift detections", "log loss", "calibration", "events consumed",
                   "event-time lag", "consumer lag", "published model version", "age of the published model"):
        assert needed in titles, needed
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasource_uid = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
