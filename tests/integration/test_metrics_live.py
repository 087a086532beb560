"""Live monitoring check (issue 5 §4): a real Kafka, the streamer, the trainer daemon and a real Prometheus (the
Debian package) scraping it with deploy/prometheus/alerts.yml loaded. Prometheus's HTTP API must show the
per-task AUC series in [0, 1], and every PromQL expression of the dashboard and the alert rules must evaluate
against it without error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from consumers.runtime.local_kafka import free_port
from streamer.topics import ensure_topics
from tests.trainer_config import write_trainer_config

pytestmark = pytest.mark.integration
yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deploy files (pip install pyyaml)")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS = shutil.which("prometheus")
TASKS = ("click", "like")
DEADLINE_S = 240
GRAFANA_VARIABLES = {"$task": ".+", "$role": ".+", "$__rate_interval": "5m", "$__interval": "1m"}


def wait_for(condition, deadline_s: float, what: str, interval_s: float = 0.5):
    """Poll ``condition()`` until it returns something truthy; fail naming ``what`` after the deadline."""
    deadline = time.monotonic() + deadline_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (OSError, ValueError) as exc:  # not up yet
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what} (last error: {last_error})")


def query(prometheus: str, expr: str) -> dict:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
        return json.loads(exc.read())


def expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/crossdistil.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(variable, value) for e in exprs]
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    return exprs + [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(none)"


def stop(process: subprocess.Popen | None, timeout_s: float = 60) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed: Debian's 'prometheus' package "
                                               "(deploy/setup.sh)")
def test_prometheus_scrapes_per_task_auc_from_the_live_trainer_and_every_expression_evaluates(
        kafka_broker: str, tmp_path: Path) -> None:
    from streamer.stream import stream_dataset

    tag = uuid.uuid4().hex[:8]
    topics = {"impressions": f"imp-live-{tag}", "feedback": f"fb-live-{tag}", "dead_letters": f"dl-live-{tag}",
              "model": f"model-live-{tag}"}
    ensure_topics(kafka_broker, 2, impression_topic=topics["impressions"], feedback_topic=topics["feedback"],
                  dead_letter_topic=topics["dead_letters"], model_topic=topics["model"])
    # Feedback within 5 s of event time and 1,000 impressions per event-second: labels close quickly.
    summary = stream_dataset(
        "synthetic", None, f"kafka://{kafka_broker}", envelope=100,
        options={"tasks": "click,like", "n_events": "30000", "rate_per_s": "1000", "delay_median_s": "1,2",
                 "max_delay_s": "5", "scale": "6", "n_users": "500", "n_items": "1000"},
        impression_topic=topics["impressions"], feedback_topic=topics["feedback"])
    assert summary["impressions"] == 30_000

    metrics_port, prometheus_port = free_port(), free_port()
    config = tmp_path / "trainer.toml"
    write_trainer_config(config, kafka_broker, topics, {
        "join.attribution_window_s": {"click": 10, "like": 10},
        "batching.batch_size": 256,
        "batching.max_batch_delay_s": 1.0,
        "model.tasks": ["click", "like"],
        "model.options": {"embedding_dim": 8, "hidden_dims": [32], "tower_dims": [16],
                          "features": {"categorical": ["user_id", "item_id", "item_category", "hour"],
                                       "numeric": ["duration_s"], "hash_buckets": 65536}},
        "checkpoint.dir": str(tmp_path / "checkpoints"),
        "checkpoint.every_steps": 20,
        "checkpoint.every_s": 0.0,
        "metrics.bind": "127.0.0.1",
        "metrics.port": metrics_port,
        "metrics.windows": [1000, 5000],
    })
    prometheus_config = tmp_path / "prometheus.yml"
    prometheus_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus/alerts.yml")],
        "scrape_configs": [{"job_name": "crossdistil-trainer",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    trainer = prometheus = None
    trainer_log = open(tmp_path / "trainer.log", "wb")
    prometheus_log = open(tmp_path / "prometheus.log", "wb")
    try:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "consumers.cli", "train", "--config", str(config)],
            cwd=REPO, stdout=trainer_log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={prometheus_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            cwd=tmp_path, stdout=prometheus_log, stderr=subprocess.STDOUT)
        api = f"http://127.0.0.1:{prometheus_port}"

        def auc_series() -> dict[str, float] | None:
            assert trainer.poll() is None, (tmp_path / "trainer.log").read_text(errors="replace")[-4000:]
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text(errors="replace")[-4000:]
            result = query(api, 'crossdistil_auc{role="student", window="1000"}')
            values = {s["metric"]["task"]: float(s["value"][1]) for s in result.get("data", {}).get("result", [])}
            defined = {task: v for task, v in values.items() if v == v}  # NaN until both classes were seen
            return defined if set(defined) == set(TASKS) else None

        try:
            values = wait_for(auc_series, DEADLINE_S, "per-task AUC series in Prometheus")
        except AssertionError as exc:  # say why: CI once saw "Connection refused" for 240 s from a live Prometheus
            raise AssertionError(f"{exc}\nprometheus.log:\n{tail(tmp_path / 'prometheus.log')}\n"
                                 f"trainer.log:\n{tail(tmp_path / 'trainer.log')}") from None
        assert all(0.0 <= v <= 1.0 for v in values.values()), values

        # Wait until a publication and some training progress are visible, so rate() and freshness
        # expressions have data; then evaluate every expression.
        wait_for(lambda: query(api, "crossdistil_publications_total > 0")["data"]["result"], DEADLINE_S,
                 "a publication in Prometheus")
        failures = {}
        for expr in expressions():
            answer = query(api, expr)
            if answer.get("status") != "success":
                failures[expr] = answer.get("error")
        assert failures == {}
        # The alert rules were loaded and evaluate without error.
        alert_rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
        expected = sum(len(group["rules"]) for group in alert_rules["groups"])

        def rules_healthy() -> bool:
            with urllib.request.urlopen(f"{api}/api/v1/rules", timeout=10) as response:
                groups = json.loads(response.read())["data"]["groups"]
            loaded = [rule for group in groups for rule in group["rules"]]
            errors = [(rule["name"], rule.get("lastError")) for rule in loaded if rule.get("health") == "err"]
            assert errors == [], errors
            return len(loaded) == expected and all(rule.get("health") == "ok" for rule in loaded)

        wait_for(rules_healthy, 30, "every alert rule evaluated with health ok")
    finally:
        stop(trainer)
        stop(prometheus)
        trainer_log.close()
        prometheus_log.close()
    assert trainer.returncode == 0, (tmp_path / "trainer.log").read_text(errors="replace")[-4000:]
