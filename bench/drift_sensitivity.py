"""How fast each drift detector and alert fires, against how often it fires for nothing (backtest path, no broker).

    python bench/drift_sensitivity.py                 # ~5 min of CPU; writes bench/results/drift/
    python bench/drift_sensitivity.py --cache /tmp/drift-cache --no-kuairand

Streams, each replayed once through the trainer's own pipeline (``consumers.tools.backtest.run_backtest``, dense
batches of 256, as the live demo trains at its default pace) with the demo's trainer configuration
(deploy/demo/trainer-synthetic.toml) on the demo's synthetic world (``consumers.tools.demo.SYNTHETIC_WORLD``):

* drifting: 120,000 impressions, ``click`` drifts at impression 60,000, for each magnitude in ``MAGNITUDES``
  (abrupt; and gradual over 10,000 impressions, recurring at 1/3 and back at 2/3, at the demo's 0.75);
* drift-free: the same world without drift (``--free-events``, 300,000 by default);
* KuaiRand-Pure (../shared/data/kuairand_pure, mappings/kuairand_pure.toml), the real log, all four tasks, with
  reports/backtest_kuairand_pure/config.toml.

Detectors are then run again, off line, on the recorded prequential predictions, batch by batch as the trainer fed
them (the same inputs in the same order give the same detections: tests/integration/test_drift_detection.py checks
this for the defaults against the replay's own), for each setting in ``SETTINGS``. Per setting: the detection
delay in samples (first detection of the drifting task at or after the first drifted sample; samples counted in
training order), false alarms (detections of the non-drifting task; of any task before the drift; every detection
on the drift-free streams) per million task-samples.

Alerts: the demo's rules (``consumers.tools.demo.demo_alert_rules``: deploy/prometheus/alerts.yml with the quality
alerts' durations divided by 60) evaluated by ``promtool test rules`` on the trainer's /metrics exposition taken
every ``SCRAPE_S`` seconds at the demo's pace (``DEMO_SAMPLES_PER_S``), with a publication (the ``published``
reference) every ``checkpoint.every_s`` seconds: ``alert_firings``. The integration test
tests/integration/test_drift_detection.py uses the same functions.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

DEMO_TRAINER = REPO_ROOT / "deploy" / "demo" / "trainer-synthetic.toml"
KUAIRAND_PURE = REPO_ROOT.parent / "shared" / "data" / "kuairand_pure" / "kuairand_pure_20220425_20220508.csv"
KUAIRAND_MAPPING = REPO_ROOT / "mappings" / "kuairand_pure.toml"
KUAIRAND_CONFIG = REPO_ROOT / "reports" / "backtest_kuairand_pure" / "config.toml"
KUAIRAND_TASKS = ["click", "long_view", "finish", "like"]
OUT = REPO_ROOT / "bench" / "results" / "drift"

MAGNITUDES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
N_EVENTS, DRIFT_AT = 120_000, 60_000
SCRAPE_S = 2.0                   # deploy/demo/prometheus.yml: scrape_interval and evaluation_interval
ALERTS = ("CrossdistilAucDrop", "CrossdistilDriftDetected")
# Detector settings compared: (detector, options); the first of each detector is the default.
SETTINGS: tuple[tuple[str, dict[str, float]], ...] = (
    ("auc_drop", {"min_drop": 0.05, "z": 4.0}),
    ("auc_drop", {"min_drop": 0.03, "z": 4.0}),
    ("auc_drop", {"min_drop": 0.02, "z": 3.0}),
    ("auc_drop", {"min_drop": 0.05, "z": 2.0}),
    ("auc_drop", {"min_drop": 0.1, "z": 4.0}),
    ("adwin", {"adwin_delta": 0.0002}),
    ("adwin", {"adwin_delta": 0.002}),
    ("adwin", {"adwin_delta": 0.00002}),
    ("page_hinkley", {"ph_threshold": 400.0}),
    ("page_hinkley", {"ph_threshold": 200.0}),
    ("page_hinkley", {"ph_threshold": 100.0}),
)


def demo_pace() -> float:
    """Samples per second of wall time in the synthetic demo: its event rate times its default speed."""
    from consumers.tools.demo import DEFAULT_SPEED
    from streamer.datasets.synthetic import SyntheticDataset

    return SyntheticDataset(n_events=0).rate_per_s * float(DEFAULT_SPEED["synthetic"])


# ---------------------------------------------------------------------------------------------- replays


def demo_config(**overrides: Any) -> Any:
    """The synthetic demo's trainer configuration, on the CPU, without a metrics port."""
    from consumers.runtime.config import load_config

    cfg = load_config(DEMO_TRAINER, env={}, overrides=["model.device=\"cpu\"", "metrics.port=0"])
    for key, value in overrides.items():
        setattr(cfg.metrics, key, value)
    return cfg


def write_log(path: Path, dataset: str, *, options: Mapping[str, Any] | None = None, source: str | None = None,
              mapping: str | None = None) -> Path:
    """An event log of a data set (``crossdistil stream --to file://``)."""
    from streamer.stream import stream_dataset

    stream_dataset(dataset, source, f"file://{path}", mapping=mapping, options=dict(options or {}))
    return path


def replay(log: Path, cfg: Any) -> Any:
    """One dense replay of ``log`` with ``cfg`` (``run_backtest``); the configuration's ``ConfigRun``."""
    import torch

    from consumers.tools.backtest import log_records, run_backtest

    torch.set_num_threads(1)
    records, _ = log_records(f"file://{log}")
    return run_backtest(records, {"run": cfg}, batching="dense", sample_every=10**9).runs["run"]


def recorded(run: Any) -> dict[str, Any]:
    """What the off-line detectors and the alerts need from a replay: per batch labels and predictions, the
    impression index of every sample (synthetic ids ``syn-N``), the replay's own detections."""
    ids = run.impression_ids
    index = np.array([int(i.split("-")[1]) if i.startswith("syn-") else -1 for i in ids], dtype=np.int64)
    return {"tasks": list(run.pipeline.tasks), "batch_sizes": list(run.batch_sizes),
            "labels": {t: [np.asarray(b) for b in run.labels[t]] for t in run.pipeline.tasks},
            "scores": {t: [np.asarray(b, dtype=np.float64) for b in run.scores[t]] for t in run.pipeline.tasks},
            "impression_index": index, "detections": list(run.detections)}


def drift_sample(rec: Mapping[str, Any], drift_at: int) -> int:
    """Trained samples before the first sample of an impression at or after ``drift_at`` (training order follows
    the join's emission order, which is close to, not exactly, impression order)."""
    after = np.flatnonzero(rec["impression_index"] >= drift_at)
    return int(after[0]) if len(after) else len(rec["impression_index"])


def save(rec: Mapping[str, Any], path: Path) -> None:
    arrays: dict[str, np.ndarray] = {"batch_sizes": np.array(rec["batch_sizes"]),
                                     "impression_index": rec["impression_index"]}
    for task in rec["tasks"]:
        arrays[f"labels/{task}"] = np.concatenate(rec["labels"][task])
        arrays[f"scores/{task}"] = np.concatenate(rec["scores"][task])
    np.savez_compressed(path, **arrays)
    path.with_suffix(".json").write_text(json.dumps({"tasks": rec["tasks"], "detections": rec["detections"]}))


def load(path: Path) -> dict[str, Any]:
    meta = json.loads(path.with_suffix(".json").read_text())
    data = np.load(path)
    cuts = np.cumsum(data["batch_sizes"])[:-1]
    return {"tasks": meta["tasks"], "batch_sizes": data["batch_sizes"].tolist(),
            "labels": {t: np.split(data[f"labels/{t}"], cuts) for t in meta["tasks"]},
            "scores": {t: np.split(data[f"scores/{t}"], cuts) for t in meta["tasks"]},
            "impression_index": data["impression_index"], "detections": meta["detections"]}


def cached(cache: Path | None, name: str, make: Any) -> dict[str, Any]:
    """``make()`` (a recorded replay), or its copy in ``cache``."""
    path = cache / f"{name}.npz" if cache else None
    if path is not None and path.exists():
        return load(path)
    rec = make()
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        save(rec, path)
    return rec


# -------------------------------------------------------------------------------------------- detectors


def run_detector(rec: Mapping[str, Any], detector: str, options: Mapping[str, float]) -> dict[str, list[int]]:
    """Samples (trained so far, at the end of the batch) at which ``detector`` fired, per task, fed batch by batch
    as ``TrainerMetrics.observe`` feeds it."""
    from consumers.core.drift import AucDropDetector, LossDriftDetectors, per_sample_log_loss

    fired: dict[str, list[int]] = {}
    for task in rec["tasks"]:
        if detector == "auc_drop":
            auc_detector = AucDropDetector(**options)
            update = auc_detector.update
        else:
            loss_detectors = LossDriftDetectors(**options)

            def update(y: np.ndarray, p: np.ndarray, d: Any = loss_detectors) -> bool:
                return detector in d.update(per_sample_log_loss(y, p))
        seen, at = 0, []
        for y, p in zip(rec["labels"][task], rec["scores"][task]):
            seen += len(y)
            if update(y, p):
                at.append(seen)
        fired[task] = at
    return fired


def replay_detections(rec: Mapping[str, Any]) -> dict[str, dict[str, list[int]]]:
    """The replay's own detections (the trainer's TrainerMetrics): task -> detector -> samples."""
    out: dict[str, dict[str, list[int]]] = {}
    for d in rec["detections"]:
        out.setdefault(d["task"], {}).setdefault(d["detector"], []).append(int(d["samples"]))
    return out


# ----------------------------------------------------------------------------------------------- alerts


def scrapes(rec: Mapping[str, Any], cfg: Any, scrape_every: int, publish_every: int) -> tuple[list[int], list[str]]:
    """The trainer's /metrics text every ``scrape_every`` trained samples (at the first batch end past each
    multiple; with the samples trained then), its metrics fed the recorded batches in order, with a publication
    (the ``published`` AUC reference) every ``publish_every`` samples."""
    from prometheus_client import CollectorRegistry, generate_latest

    from consumers.runtime.telemetry import TrainerMetrics

    clock = [0.0]
    metrics = TrainerMetrics.from_config(cfg, registry=CollectorRegistry(), clock=lambda: clock[0])
    texts: list[str] = []
    at: list[int] = []
    seen, next_scrape, next_publish = 0, scrape_every, publish_every
    for b in range(len(rec["batch_sizes"])):
        metrics.observe({t: rec["labels"][t][b] for t in rec["tasks"]}, {t: rec["scores"][t][b] for t in rec["tasks"]})
        seen += rec["batch_sizes"][b]
        if seen >= next_publish:
            metrics.mark_published_reference()
            next_publish += publish_every
        while seen >= next_scrape:
            clock[0] = next_scrape / scrape_every * SCRAPE_S
            texts.append(generate_latest(metrics.registry).decode())
            at.append(seen)
            next_scrape += scrape_every
    return at, texts


WATCHED = ("crossdistil_auc_drift", "crossdistil_window_samples", "crossdistil_drift_detections_total")


def series_of(texts: Sequence[str]) -> dict[str, list[float]]:
    """PromQL series selector -> one value per scrape (NaN where absent) for the metrics the quality alerts use."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[float]] = {}
    for i, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name not in WATCHED:
                    continue
                labels = {"job": "crossdistil-trainer", "instance": "replay:9400", **s.labels}
                key = s.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                out.setdefault(key, [math.nan] * len(texts))[i] = float(s.value)
    return out


def _duration_s(text: str) -> float:
    """Seconds of a Go/Prometheus duration such as ``1m30s`` or ``2h``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


def alert_firings(texts: Sequence[str], rules_text: str, alerts: Iterable[str] = ALERTS,
                  promtool: str | None = None) -> list[dict[str, Any]]:
    """Every (alert, labels, scrape index) at which ``promtool test rules`` finds an alert of ``rules_text`` firing
    on the scraped series (one scrape every ``SCRAPE_S`` seconds, evaluated at every scrape)."""
    import yaml

    promtool = promtool or shutil.which("promtool")
    if promtool is None:
        raise RuntimeError("promtool not found: install Debian's 'prometheus' package (deploy/setup.sh does)")
    series = series_of(texts)
    interval = f"{SCRAPE_S:g}s"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "rules.yml").write_text(rules_text)
        test = {"rule_files": ["rules.yml"], "evaluation_interval": interval, "tests": [{
            "interval": interval,
            "input_series": [{"series": key, "values": " ".join("NaN" if math.isnan(v) else f"{v:.17g}"
                                                                for v in values)}
                             for key, values in series.items()],
            "alert_rule_test": [{"eval_time": f"{i * SCRAPE_S:g}s", "alertname": name, "exp_alerts": []}
                                for i in range(1, len(texts)) for name in alerts],
        }]}
        (Path(tmp) / "test.yml").write_text(yaml.safe_dump(test, width=10**9))
        result = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp, capture_output=True, text=True,
                                timeout=600)
    text = result.stdout + result.stderr
    if result.returncode != 0 and "alertname:" not in text:
        raise RuntimeError(f"promtool test rules failed:\n{text[-3000:]}")
    firings = []
    # One block per evaluation that found alerts: "alertname: NAME, time: 1m30s," then "Labels:{...}" lines.
    for block in re.split(r"\n\s*alertname: ", "\n" + text)[1:]:
        head = re.match(r"(\w+), time: ([0-9hms.]+)", block)
        if not head:
            continue
        index = round(_duration_s(head.group(2)) / SCRAPE_S)
        for labels in re.findall(r"Labels:\{(.*?)\}", block):
            firings.append({"alert": head.group(1), "scrape": index,
                            "labels": dict(re.findall(r'(\w+)="([^"]*)"', labels))})
    return firings


def first_alerts(firings: Sequence[Mapping[str, Any]], samples_at: Sequence[int]) -> dict[str, dict[str, int]]:
    """alert -> task -> samples trained at its first firing (``samples_at``: samples trained at each scrape)."""
    out: dict[str, dict[str, int]] = {}
    for f in firings:
        task = f["labels"].get("task", "")
        at = samples_at[f["scrape"]]
        out.setdefault(f["alert"], {})
        out[f["alert"]][task] = min(at, out[f["alert"]].get(task, at))
    return out


def alerts_of(rec: Mapping[str, Any], cfg: Any) -> tuple[list[dict[str, Any]], list[int]]:
    """Alert firings of a replay at the demo's pace, and the samples trained at each scrape."""
    from consumers.tools.demo import ALERT_RULES, demo_alert_rules

    pace = demo_pace()
    scrape_every = int(round(pace * SCRAPE_S))
    publish_every = int(min(cfg.checkpoint.every_steps * cfg.batching.batch_size or math.inf,
                            cfg.checkpoint.every_s * pace or math.inf))
    samples_at, texts = scrapes(rec, cfg, scrape_every, publish_every)
    return alert_firings(texts, demo_alert_rules(ALERT_RULES.read_text())), samples_at


# ---------------------------------------------------------------------------------------------- the bench


def drifting_streams() -> list[dict[str, Any]]:
    """The drifting synthetic cases: name, stream options, drift points."""
    from consumers.tools.demo import synthetic_options

    cases = [{"name": f"abrupt_{m:g}", "type": "abrupt", "magnitude": m,
              "options": synthetic_options(N_EVENTS, "abrupt", m, "click")} for m in MAGNITUDES]
    for kind in ("gradual", "recurring"):
        cases.append({"name": f"{kind}_0.75", "type": kind, "magnitude": 0.75,
                      "options": synthetic_options(N_EVENTS, kind, 0.75, "click")})
    for case in cases:
        case["points"] = [int(p) for p in case["options"]["drift_at"].split(",")]
        case["drift_at"] = case["points"][0]
    return cases


def per_million(count: int, samples: int) -> float:
    return round(count / samples * 1e6, 2) if samples else math.nan


def summarize_case(rec: Mapping[str, Any], case: Mapping[str, Any], fired: Mapping[str, Mapping[str, list[int]]],
                   alerts: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """Delays (samples after the first drifted sample) of every setting and alert, and its false alarms."""
    start = drift_sample(rec, case["drift_at"])
    n = len(rec["impression_index"])
    out: dict[str, Any] = {"drift_sample": start, "samples": n, "delay": {}, "false_alarms": {}}
    for setting, by_task in fired.items():
        after = [s for s in by_task.get("click", []) if s >= start]
        out["delay"][setting] = after[0] - start if after else None
        out["false_alarms"][setting] = (sum(1 for s in by_task.get("click", []) if s < start)
                                        + len(by_task.get("like", [])))
    for alert in ALERTS:
        at = alerts.get(alert, {})
        out["delay"][alert] = at["click"] - start if at.get("click", -1) >= start else None
        out["false_alarms"][alert] = int("like" in at) + int(at.get("click", start) < start)
    if len(case.get("points", ())) > 1:  # recurring: the delay of the switch back too (detections after it)
        back = drift_sample(rec, case["points"][1])
        out["switch_back_sample"] = back
        out["delay_back"] = {}
        for setting, by_task in fired.items():
            after = [s for s in by_task.get("click", []) if s >= back]
            out["delay_back"][setting] = after[0] - back if after else None
    return out


def setting_name(detector: str, options: Mapping[str, float]) -> str:
    return detector + "(" + ", ".join(f"{k}={v:g}" for k, v in options.items()) + ")"


def evaluate(rec: Mapping[str, Any]) -> dict[str, dict[str, list[int]]]:
    """Every setting of ``SETTINGS`` on one recorded replay: setting -> task -> detection samples."""
    return {setting_name(d, o): run_detector(rec, d, o) for d, o in SETTINGS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--cache", default=None, help="keep the replays' predictions here and reuse them")
    parser.add_argument("--free-events", type=int, default=300_000)
    parser.add_argument("--no-kuairand", action="store_true")
    args = parser.parse_args(argv)
    cache = Path(args.cache) if args.cache else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config()
    started = time.time()
    result: dict[str, Any] = {"settings": [setting_name(d, o) for d, o in SETTINGS], "cases": {}, "drift_free": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in drifting_streams():
            name = case["name"]
            rec = cached(cache, name, lambda c=case: recorded(replay(
                write_log(Path(tmp) / f"{c['name']}.evlog", "synthetic", options=c["options"]), cfg)))
            firings, samples_at = alerts_of(rec, cfg)
            summary = summarize_case(rec, case, evaluate(rec), first_alerts(firings, samples_at))
            result["cases"][name] = {"type": case["type"], "magnitude": case["magnitude"], **summary}
            print(f"{name}: {json.dumps(summary['delay'])}", file=sys.stderr, flush=True)
        from consumers.tools.demo import synthetic_options

        free = synthetic_options(args.free_events, "none")
        streams = [("synthetic_drift_free", lambda: recorded(replay(
            write_log(Path(tmp) / "free.evlog", "synthetic", options=free), cfg)), cfg)]
        if not args.no_kuairand:
            from consumers.runtime.config import load_config

            kcfg = load_config(KUAIRAND_CONFIG, env={}, overrides=[f"model.tasks={json.dumps(KUAIRAND_TASKS)}",
                                                                  "model.device=\"cpu\"", "metrics.port=0"])
            streams.append(("kuairand_pure", lambda: recorded(replay(write_log(
                Path(tmp) / "pure.evlog", "csv", source=str(KUAIRAND_PURE), mapping=str(KUAIRAND_MAPPING)), kcfg)),
                kcfg))
        for name, make, stream_cfg in streams:
            rec = cached(cache, name, make)
            samples = len(rec["impression_index"]) * len(rec["tasks"])
            fired = evaluate(rec)
            firings, samples_at = alerts_of(rec, stream_cfg)
            alerts = first_alerts(firings, samples_at)
            counts = {s: sum(len(v) for v in by_task.values()) for s, by_task in fired.items()}
            # An alert counts once per task and firing episode start (a rise from not firing to firing).
            episodes = {a: _episodes(firings, a) for a in ALERTS}
            result["drift_free"][name] = {
                "tasks": rec["tasks"], "task_samples": samples,
                "detections": counts, "per_million": {s: per_million(c, samples) for s, c in counts.items()},
                "by_task": {s: {t: len(v) for t, v in by_task.items()} for s, by_task in fired.items()},
                "alert_episodes": episodes, "alert_first": alerts,
                "alerts_per_million": {a: per_million(c, samples) for a, c in episodes.items()},
            }
            print(f"{name}: {json.dumps(counts)} alerts {json.dumps(episodes)}", file=sys.stderr, flush=True)
    result["pace"] = {"samples_per_s": demo_pace(), "scrape_s": SCRAPE_S, "rules": "demo_alert_rules(alerts.yml)"}
    result["seconds"] = round(time.time() - started, 1)
    (out / "drift_sensitivity.json").write_text(json.dumps(result, indent=1, default=_plain) + "\n")
    plot(result, out / "drift_sensitivity.png")
    (out / "drift_sensitivity.md").write_text(markdown(result))
    print(f"wrote {out}/drift_sensitivity.json, .md and .png", file=sys.stderr)
    return 0


def markdown(result: Mapping[str, Any]) -> str:
    """The JSON's tables: delay per setting and case, false alarms per million task-samples per stream."""
    cases = list(result["cases"].items())
    names = list(result["settings"]) + list(ALERTS)
    lines = ["Detection delay in samples after the first drifted sample (click; - = not detected before the end, "
             f"{N_EVENTS - DRIFT_AT:,} samples later). False alarms: detections of like, or of click before the drift.",
             "", "| setting | " + " | ".join(name for name, _ in cases) + " |",
             "|---|" + "---|" * len(cases)]
    for n in names:
        cells = []
        for _, c in cases:
            delay, false = c["delay"].get(n), c["false_alarms"].get(n, 0)
            cells.append(("-" if delay is None else f"{delay:,}") + (f" ({false} false)" if false else ""))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    free = result["drift_free"]
    lines += ["", "False alarms per million task-samples on drift-free streams (count in brackets):", "",
              "| setting | " + " | ".join(f"{k} ({v['task_samples']:,} task-samples)" for k, v in free.items()) + " |",
              "|---|" + "---|" * len(free)]
    for n in names:
        cells = []
        for v in free.values():
            if n in v["detections"]:
                cells.append(f"{v['per_million'][n]:g} ({v['detections'][n]})")
            else:
                cells.append(f"{v['alerts_per_million'][n]:g} ({v['alert_episodes'][n]})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _episodes(firings: Sequence[Mapping[str, Any]], alert: str) -> int:
    """How many times ``alert`` started firing (per task and label set: consecutive scrapes are one episode)."""
    by_key: dict[tuple, list[int]] = {}
    for f in firings:
        if f["alert"] == alert:
            by_key.setdefault(tuple(sorted(f["labels"].items())), []).append(f["scrape"])
    return sum(1 + sum(1 for a, b in zip(s, s[1:]) if b > a + 1) for s in map(sorted, by_key.values()))


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(type(value))


def plot(result: Mapping[str, Any], path: Path) -> None:
    """Delay vs magnitude (abrupt drifts), one line per default detector and alert, and false alarms per million."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in result["cases"].values() if c["type"] == "abrupt"]
    magnitudes = [c["magnitude"] for c in cases]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    names = [s for s in result["settings"]] + list(ALERTS)
    for name in names:
        delays = [c["delay"].get(name) for c in cases]
        if all(d is None for d in delays):
            continue
        default = name in ALERTS or name in _defaults(result["settings"])
        left.plot(magnitudes, [math.nan if d is None else d for d in delays], marker="o",
                  linestyle="-" if default else ":", linewidth=2 if default else 1, label=name)
    left.axhline(20_000, color="grey", linewidth=0.8)
    left.text(magnitudes[0], 20_500, "20k samples", color="grey", fontsize=8)
    left.set_xlabel("drift magnitude (0.5 = unrelated concept, 1 = ranking reversed)")
    left.set_ylabel("detection delay (samples after the drift; missing = not detected)")
    left.set_yscale("log")
    left.set_title("abrupt drift of click, demo world and model")
    left.legend(fontsize=6)
    free = result["drift_free"]
    labels = names
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(free))
    for i, (stream, data) in enumerate(free.items()):
        values = [data["per_million"].get(n, data["alerts_per_million"].get(n, math.nan)) for n in labels]
        right.bar(x + i * width, values, width, label=stream)
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xticks(x + width / 2, labels, rotation=70, ha="right", fontsize=6)
    right.set_ylabel("false alarms per million task-samples (drift-free)")
    right.set_title("false alarms")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _defaults(settings: Sequence[str]) -> set[str]:
    """The first setting of each detector (the defaults)."""
    seen: dict[str, str] = {}
    for s in settings:
        seen.setdefault(s.split("(")[0], s)
    return set(seen.values())


if __name__ == "__main__":
    raise SystemExit(main())
