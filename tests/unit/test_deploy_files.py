"""deploy/: docker-compose accepted by `docker compose config`, Kubernetes manifests render and run the right
commands, systemd units verify, the Dockerfile builds the `crossdistil` entry point."""

from __future__ import annotations

import argparse
import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deploy files (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) if it answers, else Debian's `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (Debian: apt-get install "
                    "docker-compose)")
    result = subprocess.run([*command, "-f", str(DEPLOY / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert {"kafka", "prometheus", "grafana", "trainer", "serving", "streamer"} <= set(rendered["services"])
    assert rendered["services"]["trainer"]["command"] == ["train", "--config", "/etc/crossdistil/trainer.toml"]
    assert rendered["services"]["serving"]["command"] == ["serve", "--config", "/etc/crossdistil/serving.toml"]
    assert rendered["services"]["kafka"]["image"].startswith("apache/kafka:")


def node_flags(args: list[str]) -> argparse.Namespace:
    """``args`` of ``crossdistil train`` (after the subcommand) parsed by its real parser, checked as it checks them."""
    from consumers.trainer import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    flags = parser.parse_args(args[1:])
    assert args[0] == "train" and command.flag_problem(flags) is None, args
    return flags


def test_compose_override_runs_two_nodes_of_crossdistil_train_which_docker_does_not_restart() -> None:
    """Docker's restart policies restart after any status: the command restarts the ranks itself (only after a
    transient failure), and a diverged model's 10 leaves the containers down."""
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    files = ["-f", str(DEPLOY / "docker-compose.yml"), "-f", str(DEPLOY / "compose" / "ranks.yml")]
    result = subprocess.run([*command, *files, "config"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name, node in (("trainer", 0), ("trainer-rank1", 1)):
        service = services[name]
        assert "entrypoint" not in service  # the image's: crossdistil
        assert service["restart"] in ("no", False), service["restart"]
        flags = node_flags(service["command"])
        assert (flags.world_size, flags.nnodes, flags.node_rank, flags.master_addr) == (2, 2, node, "trainer")
    prometheus = (DEPLOY / "prometheus" / "prometheus.ranks.yml").read_text()
    assert '"trainer:9400", "trainer-rank1:9401"' in prometheus  # metrics.port + rank


def test_kubernetes_ranks_overlay_runs_an_indexed_job_of_nodes_that_a_permanent_status_fails() -> None:
    """The trainer's Deployment becomes an Indexed Job whose pod i is node i of ``crossdistil train --nnodes``;
    podFailurePolicy fails the Job on the statuses the command does not restart (a StatefulSet's pods are always
    restarted), and ignores disruptions and the status a stop ends the command with (``--exit-on-stop``: a pod that
    exits 0 is done, so a preempted pod's stop would complete the Job)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the overlay is rendered with kustomize")
    from consumers.trainer.command import NOT_RESTARTED

    result = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s-ranks")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert ("Deployment", "crossdistil-trainer") not in kinds and ("Deployment", "crossdistil-serving") in kinds
    assert not any(d["kind"] == "StatefulSet" for d in documents)
    job = next(d for d in documents if d["kind"] == "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    rules = spec["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert fail["onExitCodes"]["operator"] == "In" and fail["onExitCodes"]["containerName"] == container["name"]
    assert set(fail["onExitCodes"]["values"]) == set(NOT_RESTARTED)
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert "command" not in container  # the image's entrypoint: crossdistil
    env = {e["name"]: e for e in container.get("env", [])}
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == index
    args = container["args"]
    assert args[args.index("--node-rank") + 1] == "$(NODE_RANK)"
    flags = node_flags([a.replace("$(NODE_RANK)", "1") for a in args])
    assert flags.nnodes == spec["completions"] and flags.world_size % flags.nnodes == 0
    stopped = next(r for r in rules if r["action"] == "Ignore" and "onExitCodes" in r)
    assert stopped["onExitCodes"] == {"containerName": container["name"], "operator": "In",
                                      "values": [flags.exit_on_stop]}
    assert flags.exit_on_stop not in fail["onExitCodes"]["values"]
    service = next(d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert flags.master_addr == f"{job['metadata']['name']}-0.{pod['subdomain']}"  # pod 0's hostname
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {d["metadata"]["name"]: d for d in documents if d["kind"] == "PersistentVolumeClaim"}
    claim = claims[volumes["checkpoints"]["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # one volume, both pods, any node
    budget = next(d for d in documents if d["kind"] == "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1  # a drain evicts one pod at a time; the Job makes it again
    assert budget["spec"]["selector"]["matchLabels"].items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_compose_mounts_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_compose_trainer_configuration_loads(tmp_path: Path) -> None:
    from consumers.runtime.config import load_config

    cfg = load_config(str(DEPLOY / "compose" / "trainer.toml"), env={})
    assert cfg.kafka.bootstrap == "kafka:9092"
    assert (cfg.metrics.bind, cfg.metrics.port) == ("0.0.0.0", 9400)


def k8s_documents() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl:  # render through kustomize: catches a broken kustomization too (no cluster needed)
        result = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return [d for d in yaml.safe_load_all(result.stdout) if d]
    return [d for path in sorted((DEPLOY / "k8s").glob("*.yaml")) if path.name != "kustomization.yaml"
            for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_manifests_run_both_daemons_with_probes_on_their_metrics_ports() -> None:
    documents = k8s_documents()
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    assert set(deployments) == {"crossdistil-trainer", "crossdistil-serving"}
    expected = {"crossdistil-trainer": (["train", "--config", "/etc/crossdistil/trainer.toml"], 9400),
                "crossdistil-serving": (["serve", "--config", "/etc/crossdistil/serving.toml"], 9401)}
    for name, (args, port) in expected.items():
        spec = deployments[name]["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        container = spec["template"]["spec"]["containers"][0]
        assert container["args"] == args
        assert container["ports"][0]["containerPort"] == port
        assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
        assert spec["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert deployments["crossdistil-trainer"]["spec"]["replicas"] == 1
    assert deployments["crossdistil-trainer"]["spec"]["strategy"]["type"] == "Recreate"
    config = next(d for d in documents if d["kind"] == "ConfigMap")
    assert {"trainer.toml", "serving.toml"} <= set(config["data"])


def test_kubernetes_trainer_configuration_loads(tmp_path: Path) -> None:
    from consumers.runtime.config import load_config

    config = next(d for d in k8s_documents() if d["kind"] == "ConfigMap")
    path = tmp_path / "trainer.toml"
    path.write_text(config["data"]["trainer.toml"])
    cfg = load_config(str(path), env={})
    assert cfg.metrics.bind == "0.0.0.0" and cfg.checkpoint.dir == "/var/lib/crossdistil/checkpoints"


@pytest.mark.parametrize("unit, command", [
    ("crossdistil-trainer.service", "train --config /etc/crossdistil/trainer.toml"),
    ("crossdistil-serving.service", "serve --config /etc/crossdistil/serving.toml"),
])
def test_systemd_units_run_the_daemon_and_verify(unit: str, command: str, tmp_path: Path) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read_string(text)
    exec_start = parser["Service"]["ExecStart"]
    assert exec_start.endswith(f"crossdistil {command}")
    assert parser["Service"]["Restart"] == "on-failure"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed: unit syntax checked by configparser only")
    # verify insists that ExecStart exists; point it at a binary that does, keep every other line.
    copy = tmp_path / unit
    copy.write_text(text.replace(exec_start.split()[0], "/bin/echo"))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_dockerfile_installs_the_package_and_enters_through_crossdistil() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["crossdistil"]' in text
    for package in ("streamer", "consumers", "models"):
        assert f"COPY {package} ./{package}" in text
    assert "EXPOSE 9400 9401" in text
    for copied in ("pyproject.toml", "README.md"):
        assert (ROOT / copied).exists(), copied
