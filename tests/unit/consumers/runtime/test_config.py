import pytest

from consumers.runtime.config import Config, ConfigError, load_config, reference_markdown, to_toml

pytestmark = pytest.mark.unit


def test_defaults_load_without_a_file():
    assert load_config(None, env={}) == Config()


def test_file_then_env_then_flags_take_precedence(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[kafka]\nbootstrap = "file:1"\ngroup_id = "from-file"\n[batching]\nbatch_size = 64\n')
    env = {"CROSSDISTIL__KAFKA__BOOTSTRAP": "env:2", "CROSSDISTIL__BATCHING__BATCH_SIZE": "128"}
    cfg = load_config(path, env=env, overrides=["batching.batch_size=512"])
    assert cfg.kafka.group_id == "from-file"
    assert cfg.kafka.bootstrap == "env:2"
    assert cfg.batching.batch_size == 512


def test_unknown_key_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"batching\.bogus: unknown key.*batch_size"):
        load_config(None, env={}, overrides=["batching.bogus=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"batching\.batch_size: expected an integer"):
        load_config(None, env={}, overrides=['batching.batch_size="many"'])


def test_invalid_value_is_rejected():
    with pytest.raises(ConfigError, match=r"batching\.batch_size: must be > 0"):
        load_config(None, env={}, overrides=["batching.batch_size=0"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_env_list_values_split_on_commas():
    cfg = load_config(None, env={"CROSSDISTIL__MODEL__TASKS": "click,like"})
    assert cfg.model.tasks == ["click", "like"]


def test_printed_effective_config_loads_back_to_the_same(tmp_path):
    cfg = load_config(None, env={}, overrides=["join.attribution_window_s={click = 60, like = 3600}"])
    path = tmp_path / "effective.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path, env={}) == cfg
    assert cfg.digest() == load_config(path, env={}).digest()


def test_reference_lists_every_key():
    ref = reference_markdown()
    for key in ("kafka.bootstrap", "join.attribution_window_s", "checkpoint.keep_last", "metrics.port"):
        assert f"`{key}`" in ref


def test_tables_merge_so_a_secret_from_the_environment_keeps_the_files_other_client_options(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[kafka.client_options]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n')
    env = {"CROSSDISTIL__KAFKA__CLIENT_OPTIONS__SASL_PLAIN_PASSWORD": '"s3cret"'}
    cfg = load_config(path, env=env, overrides=["join.attribution_window_s.like=10"])
    assert cfg.kafka.client_options == {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                                        "sasl_plain_password": "s3cret"}
    assert cfg.join.attribution_window_s == {"like": 10}


def test_drift_settings_reach_the_detectors_and_bad_ones_are_refused() -> None:
    from consumers.runtime.telemetry import TrainerMetrics

    cfg = load_config(None, env={}, overrides=["metrics.drift_ph_threshold=100.0", "metrics.drift_adwin_delta=0.05",
                                               "metrics.drift_ph_delta=0.01"])
    detectors = TrainerMetrics.from_config(cfg)._detectors[cfg.model.tasks[0]]
    assert detectors._page_hinkley.threshold == 100.0 / detectors.chunk and detectors._adwin.delta == 0.05
    assert detectors._page_hinkley.delta == 0.01
    for bad in ("metrics.drift_ph_threshold=0.0", "metrics.drift_adwin_delta=1.5", "kafka.stall_exit_s=-1.0",
                "metrics.drift_ph_delta=-0.1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, env={}, overrides=[bad])


def test_the_producers_compression_defaults_to_lz4_and_an_unknown_codec_is_refused() -> None:
    assert load_config(None, env={}).kafka.compression == "lz4"
    assert load_config(None, env={}, overrides=["kafka.compression='zstd'"]).kafka.compression == "zstd"
    with pytest.raises(ConfigError, match="kafka.compression: one of none, gzip, snappy, lz4, zstd"):
        load_config(None, env={}, overrides=["kafka.compression='brotli'"])
