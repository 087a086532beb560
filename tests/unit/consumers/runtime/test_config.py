import dataclasses
import re

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
    cfg = load_config(None, env={}, overrides=["join.attribution_window_s={click = 60, long_view = 3600}"])
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
    cfg = load_config(path, env=env, overrides=["join.attribution_window_s.long_view=10"])
    assert cfg.kafka.client_options == {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                                        "sasl_plain_password": "s3cret"}
    assert cfg.join.attribution_window_s == {"long_view": 10}


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


def test_a_window_for_a_misspelt_task_is_refused_naming_it_and_the_tasks() -> None:
    with pytest.raises(ConfigError, match=r"\['clik'\] are not tasks of model.tasks \['click', 'long_view'\]"):
        load_config(None, env={}, overrides=["join.attribution_window_s={clik = 60}"])


def test_a_window_table_may_name_other_tasks_when_it_names_every_task_of_model_tasks() -> None:
    # one table for every outcome of a data set, model.tasks picking some (reports/backtest_kuairand_pure/config.toml)
    table = "join.attribution_window_s={click = 60, long_view = 900, like = 900, follow = 900}"
    assert load_config(None, env={}, overrides=[table]).join.attribution_window_s["like"] == 900
    # auxiliary and counted tasks are tasks of model.tasks: their windows are theirs
    counted = load_config(None, env={}, overrides=[
        "model.tasks=['click', 'follow']", "join.attribution_window_s={follow = 900}",
        "model.options={aux_tasks = ['follow'], counted_tasks = ['follow'], count_features = ['user_id']}"])
    assert counted.join.attribution_window_s == {"follow": 900}


@pytest.mark.parametrize("bootstrap", ["127.0.0.1:9092", "broker-1.example:9093,broker-2.example:9093", "[::1]:9092",
                                       "SASL_SSL://broker:9094", " a:1 , b:65535 "])
def test_bootstrap_takes_comma_separated_host_port_and_bracketed_ipv6(bootstrap: str) -> None:
    assert load_config(None, env={"CROSSDISTIL__KAFKA__BOOTSTRAP": bootstrap}).kafka.bootstrap == bootstrap


@pytest.mark.parametrize("bootstrap, problem", [
    ("", "empty"), ("   ", "empty"), ("127.0.0.1:notaport", "'127.0.0.1:notaport' is not HOST:PORT"),
    ("broker:0", "port of 1..65535"), ("broker:65536", "port of 1..65535"), ("broker", "'broker' is not HOST:PORT"),
    (":9092", "':9092' is not HOST:PORT"), ("a:9092,", "'' is not HOST:PORT"), ("::1:9092", "IPv6 .* in brackets"),
])
def test_a_malformed_bootstrap_is_refused_naming_the_server(bootstrap: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"kafka.bootstrap: .*{problem}"):
        load_config(None, env={"CROSSDISTIL__KAFKA__BOOTSTRAP": bootstrap})


def float_keys() -> list[str]:
    cfg = Config()
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, section.name))
            if isinstance(getattr(getattr(cfg, section.name), f.name), float)]


@pytest.mark.parametrize("key", float_keys())
def test_nan_and_infinity_are_refused_for_every_number_setting(key: str) -> None:
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(ConfigError, match=f"{key}: must be a finite number"):
            load_config(None, env={}, overrides=[f"{key}={value}"])


@pytest.mark.parametrize("setting, problem", [
    ("checkpoint.every_steps=-5", r"must be >= 0 \(0 = off\)"), ("checkpoint.every_s=-1", r"must be >= 0 \(0 = off\)"),
    ("join.default_window_s=-10", "must be >= 0"), ("join.idle_timeout_s=-1", r"must be >= 0 \(0 = never\)"),
    ("join.max_future_s=-60", r"must be >= 0 \(0 = no bound\)"),
    ("batching.max_batch_delay_s=-0.5", "must be >= 0"), ("kafka.poll_timeout_ms=-1", "must be >= 0"),
    ("kafka.max_poll_interval_ms=0", "must be > 0"), ("distributed.timeout_s=0", "must be > 0"),
    ("distributed.average_every_steps=-1", "must be >= 0"), ("metrics.windows=[0, -5]", "a list of sample counts > 0"),
    ("metrics.windows=['a']", "a list of sample counts > 0"), ("metrics.windows=[]", "a list of sample counts > 0"),
    ("publish.chunk_bytes=10", "must be 16384..16711680 bytes"),
    ("publish.chunk_bytes=20000000", "must be 16384..16711680 bytes"), ("metrics.port=99999", "must be 0..65535"),
    ("metrics.port=-1", "must be 0..65535"), ("join.attribution_window_s={click = -1}", "expected seconds >= 0"),
    ("join.attribution_window_s={click = true}", "expected seconds >= 0"), ("checkpoint.dir=' '", "empty"),
])
def test_a_number_out_of_its_range_is_refused_naming_the_key(setting: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"{re.escape(setting.split('=')[0])}.*: {problem}"):
        load_config(None, env={}, overrides=[setting])


def test_zero_keeps_meaning_off_where_the_help_says_so() -> None:
    cfg = load_config(None, env={}, overrides=["checkpoint.every_steps=0", "checkpoint.every_s=0", "metrics.port=0",
                                               "kafka.stall_exit_s=0", "join.idle_timeout_s=0",
                                               "join.max_future_s=0"])
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.every_s, cfg.metrics.port) == (0, 0.0, 0)
    assert cfg.join.max_future_s == 0.0


def test_a_directory_given_as_the_configuration_file_is_named_as_one(tmp_path) -> None:
    with pytest.raises(ConfigError, match=f"configuration file {re.escape(str(tmp_path))} is a directory"):
        load_config(tmp_path, env={})


def test_a_configuration_file_that_is_not_utf8_is_named_with_its_first_bad_byte(tmp_path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(b"[batching]\nbatch_size = 3 # \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"latin.toml is not UTF-8 \(at byte offset 28: 0xff\)"):
        load_config(path, env={})


def test_an_unknown_or_bad_key_names_where_it_was_set(tmp_path) -> None:
    """A typo in an environment variable, a --set or the file: the error says which one (the key alone did not)."""
    with pytest.raises(ConfigError, match=r"^batchin: unknown key .*\(set by environment variable "
                                          r"CROSSDISTIL__BATCHIN__BATCH_SIZE\)$"):
        load_config(None, env={"CROSSDISTIL__BATCHIN__BATCH_SIZE": "3"})
    with pytest.raises(ConfigError, match=r"^batching.batch_size: expected an integer, got 'x' \(set by --set "
                                          r"batching.batch_size=x\)$"):
        load_config(None, env={"CROSSDISTIL__BATCHING__MAX_BATCH_DELAY_S": "1"}, overrides=["batching.batch_size=x"])
    with pytest.raises(ConfigError, match=r"^kafka.client_options: expected a table, got 3 \(set by "
                                          r"environment variable CROSSDISTIL__KAFKA__CLIENT_OPTIONS\)$"):
        load_config(None, env={"CROSSDISTIL__KAFKA__CLIENT_OPTIONS": "3"})
    (file := tmp_path / "trainer.toml").write_text("[batching]\nbatch_sise = 3\n")
    with pytest.raises(ConfigError, match=rf"^batching.batch_sise: unknown key .*\(in {file}\)$"):
        load_config(file, env={})
