"""Every configuration file shipped in deploy/ loads with the daemons' own loader (no unknown or mistyped key)."""

from pathlib import Path

import pytest

from consumers.runtime.config import load_config

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SHIPPED = sorted(p for p in DEPLOY.rglob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shipped_toml_config_loads(path):
    load_config(path, env={})


def test_k8s_configmap_configs_load_and_listen_where_the_pods_expect(tmp_path):
    yaml = pytest.importorskip("yaml")
    configmap = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())
    configs = {}
    for name, text in configmap["data"].items():
        if name.endswith(".toml"):
            path = tmp_path / name
            path.write_text(text)
            configs[name] = load_config(path, env={})
    assert (configs["serving.toml"].serving.bind, configs["serving.toml"].serving.port) == ("0.0.0.0", 9401)
    assert (configs["trainer.toml"].metrics.bind, configs["trainer.toml"].metrics.port) == ("0.0.0.0", 9400)
