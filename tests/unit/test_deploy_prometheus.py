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
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.compose.yml", "prometheus.ranks.yml"])
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
    metrics.counted_positives("follow", 1)  # a counted task's (model.options.counted_tasks)
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


def test_dashboard_reads_the_prometheus_its_user_picks() -> None:
    """Imported by hand into any Grafana, the dashboard asks which Prometheus to read (a datasource variable,
    Grafana's default Prometheus unless another is chosen) instead of naming one uid that only the compose
    provisioning creates; provisioned, the compose Prometheus is that default."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    queried = [p["datasource"] for p in dashboard["panels"] if p["type"] != "row"]
    queried += [t["datasource"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queried += [v["datasource"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    queried += [a["datasource"] for a in dashboard["annotations"]["list"]]
    assert len(queried) > 20
    for datasource in queried:
        assert datasource == {"type": "prometheus", "uid": "${datasource}"}
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert [d["isDefault"] for d in provisioned["datasources"] if d["type"] == "prometheus"] == [True]


def _join_counter_series(events: list, minutes: int = 40) -> dict[str, list[float]]:
    """Replay ``events`` ((topic, event) pairs, in the order a producer wrote them) through the trainer's join and
    metrics, and read crossdistil_join_events_total{outcome} once per 1/minutes of the stream: a minute each."""
    from consumers.core.join import AttributionJoin, JoinConfig

    join = AttributionJoin(JoinConfig({"click": 30.0, "long_view": 700.0, "like": 700.0}))
    metrics = TrainerMetrics(["click", "long_view", "like"], windows=(100,), registry=CollectorRegistry())
    series: dict[str, list[float]] = {"feedback": [0.0], "late_feedback": [0.0]}
    step = -(-len(events) // minutes)
    for start in range(0, len(events), step):
        for topic, event in events[start:start + step]:
            join.add_events([event], (topic, 0), now=0.0)
            join.emit()
        metrics.join_counters(join.counters)
        for outcome in series:
            series[outcome].append(metrics.registry.get_sample_value(
                "crossdistil_join_events_total", {"outcome": outcome}))
    return series


def _late_feedback_alert_fires(tmp_path: Path, series: dict[str, list[float]]) -> bool:
    """Whether CrossdistilLateFeedback (deploy/prometheus/alerts.yml) fires on ``series`` at its end (promtool)."""
    minutes = len(series["feedback"]) - 1
    labels = 'job="crossdistil-trainer",instance="replay:9400"'
    test = {"rule_files": [str(PROMETHEUS / "alerts.yml")], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": f'crossdistil_join_events_total{{{labels},outcome="{outcome}"}}',
                          "values": " ".join(f"{v:g}" for v in values)} for outcome, values in series.items()],
        "alert_rule_test": [{"eval_time": f"{minutes}m", "alertname": "CrossdistilLateFeedback", "exp_alerts": []}],
    }]}
    path = tmp_path / "late_feedback_test.yml"
    path.write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0 or "CrossdistilLateFeedback" in result.stdout + result.stderr, result.stderr
    return result.returncode != 0  # "no alert expected" fails exactly when the alert fires


@pytest.mark.slow
@needs_promtool
def test_the_late_feedback_alert_fires_on_out_of_order_feedback_and_not_on_the_ordered_stream(
        tmp_path: Path, shared_data: Path) -> None:
    """KuaiRand as the streamer writes it (event-time order: no label is late), and as a producer that writes each
    user's days of events in one go (user after user, into one partition): there the watermark runs ahead with
    the first users and nearly every later label is dropped as late. The alert fires only on the second."""
    from streamer.datasets import open_dataset
    from streamer.stream import merge_events

    ordered = [(r.topic, dict(r.event)) for r in merge_events(open_dataset("kuairand", shared_data / "kuairand")
                                                              .interactions())]
    by_user: dict[str, list] = {}
    users = {e["impression_id"]: e["user_id"] for t, e in ordered if t == "impressions"}
    for topic, event in ordered:
        by_user.setdefault(users[event["impression_id"]], []).append((topic, event))
    per_user = [pair for user in sorted(by_user) for pair in by_user[user]]

    calm, late = _join_counter_series(ordered), _join_counter_series(per_user)
    assert calm["late_feedback"][-1] / calm["feedback"][-1] < 0.01 < late["late_feedback"][-1] / late["feedback"][-1]
    assert not _late_feedback_alert_fires(tmp_path, calm)
    assert _late_feedback_alert_fires(tmp_path, late)
