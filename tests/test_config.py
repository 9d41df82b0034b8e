"""Configuration: loading, overrides, and a clear error for every invalid value (before any process)."""
import json

import pytest

from resbm_ds.cli import ConfigError
from resbm_ds.config import load_config
from resbm_ds.model.pipeline import layer_specs, stage_parts


def invalid(overrides, world_size=None):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides).validate(world_size=world_size)
    return e.value


def test_defaults_are_valid_and_overrides_are_typed():
    cfg = load_config(None, ["model.hidden_size=512", "train.lr=3e-4", "train.betas=[0.9, 0.99]",
                             "deepspeed.zero_optimization.stage=1"]).validate(world_size=4)
    assert cfg.model.hidden_size == 512 and cfg.train.lr == 3e-4 and cfg.train.betas == (0.9, 0.99)
    assert cfg.zero_stage == 1 and cfg.code_width == 16 and cfg.compression_ratio("model") == 512 * 4 / (16 * 4)   # ids read locally
    assert cfg.ds["gradient_clipping"] == 1.0   # the rest of the DeepSpeed JSON is kept


def test_yaml_file_and_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {hidden_size: 128, num_heads: 8}\nbottleneck: {width: 4}\n")
    cfg = load_config(str(f), ["bottleneck.segments=4"]).validate()
    assert cfg.model.hidden_size == 128 and cfg.code_width == 4 and cfg.compression_ratio("model") == 128 * 4 / (4 * 4)
    assert cfg.bottleneck.segments == 4


@pytest.mark.parametrize("overrides,key,phrase", [
    (["model.hidden_size=250"], "model.hidden_size", "divisible by model.num_heads"),
    (["bottleneck.width=256"], "bottleneck.width", "< model.hidden_size"),
    (["bottleneck.ratio=3"], "bottleneck.ratio", "divide model.hidden_size"),
    (["pipeline.stages=8", "bottleneck.segments=8"], "bottleneck.segments", "at most model.num_layers"),
    (["pipeline.stages=5", "model.num_layers=4", "bottleneck.segments=4"], "pipeline.stages", "more stages than layers"),
    (["pipeline.stages=3", "bottleneck.segments=4"], "pipeline.stages", "bottleneck boundaries"),
    (["deepspeed.zero_optimization.stage=2"], "deepspeed.zero_optimization.stage", "incompatible with pipeline"),
    (["deepspeed.zero_optimization.stage=3"], "deepspeed.zero_optimization.stage", "incompatible with pipeline"),
    (["model.num_kv_heads=3"], "model.num_kv_heads", "divide model.num_heads"),
    (["bottleneck.identity=diagonal"], "bottleneck.identity", "allowed"),
    (["bottleneck.method=zip"], "bottleneck.method", "allowed"),
    (["bottleneck.wire_dtype=int4"], "bottleneck.wire_dtype", "allowed"),
    (["data.seq_len=1024"], "data.seq_len", "max_seq_len"),
    (["deepspeed.fp16.enabled=true"], "deepspeed.fp16.enabled", "bf16 or fp32"),
    (["deepspeed.optimizer={type: Adam}"], "deepspeed.optimizer", "train."),
    (["model.hidden_size=-64"], "model.hidden_size", ">= 1"),
])
def test_invalid_values_name_key_value_and_allowed(overrides, key, phrase):
    err = invalid(overrides)
    assert err.key == key and phrase in str(err) and key in str(err)


def test_world_size_checks():
    assert "must divide the world size" in str(invalid(["pipeline.stages=2"], world_size=3))
    err = invalid(["deepspeed.train_batch_size=64"], world_size=4)
    assert err.key == "deepspeed.train_batch_size" and "data-parallel size (2)" in str(err)


def test_unknown_keys_and_bad_types_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"model.hidden_sise.*allowed in this section"):
        load_config(None, ["model.hidden_sise=4"])
    with pytest.raises(ConfigError, match=r"model.num_layers='four'.*type int"):
        load_config(None, ["model.num_layers=four"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["justakey"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="no such DeepSpeed JSON"):
        load_config(None, [f"deepspeed={tmp_path / 'missing.json'}"])


def test_deepspeed_json_file_is_loaded(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8,
                              "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    cfg = load_config(None, [f"deepspeed={ds}"]).validate(world_size=2)
    assert (cfg.precision, cfg.zero_stage, cfg.micro_batch_size, cfg.grad_accum_steps) == ("bf16", 1, 2, 8)


def test_stage_cuts_fall_right_after_encoders():
    cfg = load_config(None, ["model.num_layers=6", "bottleneck.segments=6"]).validate()
    specs, _ = layer_specs(cfg.spec)
    names = [s.typename.__name__ for s in specs]
    assert names.count("BottleneckEncoder") == names.count("BottleneckDecoder") == 5
    for S in (1, 2, 3, 6):
        parts = stage_parts(cfg.spec, S)
        assert len(parts) == S + 1 and parts[0] == 0 and parts[-1] == len(specs)
        for cut in parts[1:-1]:
            assert names[cut - 1] == "BottleneckEncoder" and names[cut] == "BottleneckDecoder"
    # Same global layer indices whatever the stage count: blocks keep their positions.
    assert stage_parts(cfg.spec, 2)[1] in stage_parts(cfg.spec, 6)


@pytest.mark.parametrize("env, value, phrases", [
    ("RESBM_DIST_TIMEOUT", "abc", ["RESBM_DIST_TIMEOUT (runtime.dist_timeout_s)", "'abc'", "int"]),
    ("RESBM_DIST_TIMEOUT", "0", ["runtime.dist_timeout_s (RESBM_DIST_TIMEOUT)", ">= 1"]),
    ("RESBM_DIST_TIMEOUT", "2.5", ["RESBM_DIST_TIMEOUT (runtime.dist_timeout_s)", "int"]),
    ("RESBM_STRICT_LAYOUT", "maybe", ["RESBM_STRICT_LAYOUT (runtime.strict_layout)", "bool"]),
    ("RESBM_NET_IFACE", "no-such-if0", ["runtime.net_iface (RESBM_NET_IFACE)", "no such network interface", "'lo'"]),
])
def test_environment_settings_are_checked_like_config_keys(monkeypatch, env, value, phrases):
    from resbm_ds.launch import check_config
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as e:
        check_config(load_config(None, []), 2)     # the interface: what the machine has (launch.check_machine)
    for phrase in phrases:
        assert phrase in str(e.value), (phrase, str(e.value))


def test_runtime_settings_come_from_file_env_then_command_line_and_are_recorded(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("runtime: {dist_timeout_s: 600, strict_layout: true}\n")
    for env in ("RESBM_DIST_TIMEOUT", "RESBM_STRICT_LAYOUT", "RESBM_NET_IFACE"):
        monkeypatch.delenv(env, raising=False)
    assert load_config(str(f)).validate().runtime.dist_timeout_s == 600
    monkeypatch.setenv("RESBM_DIST_TIMEOUT", "45")
    monkeypatch.setenv("RESBM_STRICT_LAYOUT", "0")
    monkeypatch.setenv("RESBM_NET_IFACE", "lo")
    cfg = load_config(str(f)).validate()
    assert (cfg.runtime.dist_timeout_s, cfg.runtime.strict_layout, cfg.runtime.net_iface) == (45, False, "lo")
    assert cfg.to_dict()["runtime"] == {"dist_timeout_s": 45, "strict_layout": False, "net_iface": "lo"}
    assert load_config(str(f), ["runtime.dist_timeout_s=7"]).validate().runtime.dist_timeout_s == 7


# ---- the one translator: pydantic's ValidationError -> `invalid config: KEY=VALUE: ALLOWED` ----------
def pydantic_error(model, raw):
    from pydantic import ValidationError
    with pytest.raises(ValidationError) as e:
        model.model_validate(raw)
    return e.value


@pytest.mark.parametrize("raw, line", [
    ({"bottleneck": {"method": "zip"}},
     "invalid config: bottleneck.method='zip': allowed: ['resbm', 'none', 'bottleneck-noskip', 'subspace']"),
    ({"tracking": {"wandb_mode": "loud"}},
     "invalid config: tracking.wandb_mode='loud': allowed: [None, 'online', 'offline', 'disabled']"),
    ({"model": {"hidden_size": 0}}, "invalid config: model.hidden_size=0: must be >= 1"),
    ({"sync": {"outer_momentum": 1.0}}, "invalid config: sync.outer_momentum=1.0: must be in [0, 1)"),
    ({"runtime": {"dist_timeout_s": 0}}, "invalid config: runtime.dist_timeout_s=0: must be >= 1 (seconds)"),
    ({"train": {"eval_every": 0}}, "invalid config: train.eval_every=0: must be an integer >= 1"),
    ({"model": {"hidden_sise": 4}}, "invalid config: model.hidden_sise=4: unknown key; allowed in this section: "
                                    "['attention_bias', 'embed_std', 'hidden_size', 'init_from_hf', 'init_std', "
                                    "'intermediate_size', 'max_seq_len', 'norm_eps', 'num_heads', 'num_kv_heads', "
                                    "'num_layers', 'rope_theta', 'tie_embeddings', 'vocab_size']"),
    ({"model": {"num_layers": True}}, "invalid config: model.num_layers=True: must be of type int"),
    ({"model": {"num_layers": "3"}}, "invalid config: model.num_layers='3': must be of type int"),
    ({"sync": {"bits": "two"}}, "invalid config: sync.bits='two': must be of type int"),
    ({"train": {"betas": [0.9]}}, "invalid config: train.betas=[0.9]: must be a list of 2 values"),
    ({"seed": None}, "invalid config: seed=None: must not be empty (type int)"),
    ({"wire": 5}, "invalid config: wire=5: must be a mapping"),
])
def test_the_translator_gives_one_line_per_pydantic_error(raw, line):
    from resbm_ds.config import Config, config_error
    err = config_error(pydantic_error(Config, raw), Config)
    assert str(err) == line and "\n" not in str(err)
    assert err.key == line.split(": ")[1].split("=")[0]


def test_yaml_values_are_read_as_before_not_as_pydantic_coerces():
    from resbm_ds.config import Config
    cfg = Config.model_validate({"train": {"lr": "3e-4", "betas": [0, 1e-1]}, "model": {"rope_theta": 500000}})
    assert cfg.train.lr == 3e-4 and cfg.train.betas == (0.0, 0.1) and cfg.model.rope_theta == 500000.0
    assert type(cfg.model.rope_theta) is float and type(cfg.train.betas) is tuple


def test_a_key_changed_after_loading_is_checked_by_validate():
    cfg = load_config(None, [])
    cfg.bottleneck.identity = "diagonal"
    with pytest.raises(ConfigError, match=r"^invalid config: bottleneck.identity='diagonal': allowed: \["):
        cfg.validate()


def test_choices_are_listed_from_the_schema():
    from resbm_ds.config import BottleneckConfig, TrackingConfig, WireConfig, allowed_values
    from resbm_ds.wire_bytes import CODEC_BITS, DTYPES
    assert allowed_values(BottleneckConfig, "wire_dtype") == ["model", *DTYPES]
    assert allowed_values(WireConfig, "codec") == ["none", *CODEC_BITS]
    assert allowed_values(TrackingConfig, "wandb_mode") == [None, "online", "offline", "disabled"]


@pytest.mark.parametrize("override, line", [
    ("deepspeed.zero_optimization.bogus=1", "invalid config: deepspeed.zero_optimization.bogus=1: Extra inputs are "
                                            "not permitted (DeepSpeed's DeepSpeedZeroConfig)"),
    ("deepspeed.bf16.enabled=maybe", "invalid config: deepspeed.bf16.enabled='maybe': Input should be a valid "
                                     "boolean, unable to interpret input (DeepSpeed's DeepSpeedBF16Config)"),
])
def test_deepspeed_schema_errors_go_through_the_same_translator(override, line):
    from resbm_ds.launch import check_deepspeed_schema
    with pytest.raises(ConfigError) as e:
        check_deepspeed_schema(load_config(None, [override]))
    assert str(e.value) == line


# ---- the model alone: ModelSpec --------------------------------------------------------------------
def test_the_model_spec_holds_the_model_and_nothing_of_the_run():
    from resbm_ds.config import ModelSpec
    cfg = load_config(None, ["bottleneck.width=8", "bottleneck.wire_dtype=bf16", "deepspeed.bf16.enabled=true",
                             "seed=7", "train.out_dir=/somewhere", "tracking.wandb=true"])
    spec = cfg.spec
    assert set(spec.to_dict()) == {"model", "bottleneck", "seed", "precision"}
    assert (spec.seed, spec.precision, spec.code_width, spec.token_channel, spec.token_ids, spec.sends_token_ids) == (
        7, "bf16", 8, "hashed", "local", False)
    assert (spec.wire_elem_bytes, spec.model_elem_bytes, spec.id_dtype) == (2, 2, __import__("torch").int16)
    assert (cfg.code_width, cfg.token_channel, cfg.token_ids, cfg.sends_token_ids) == (8, "hashed", "local", False)
    sent = load_config(None, ["bottleneck.token_ids=sent"])
    assert (sent.token_channel, sent.token_ids, sent.sends_token_ids) == ("hashed", "sent", True)
    plain = load_config(None, ["bottleneck.method=none"])
    assert (plain.token_channel, plain.token_ids, plain.sends_token_ids) == ("none", "sent", False)
    subspace = load_config(None, ["bottleneck.method=subspace"])
    assert (subspace.token_channel, subspace.token_ids, subspace.sends_token_ids) == ("none", "sent", True)
    assert ModelSpec.from_dict(spec.to_dict()).to_dict() == spec.to_dict() == ModelSpec.from_dict(cfg.to_dict()).to_dict()
    assert spec.to_dict()["bottleneck"]["token_channel"] == "hashed"     # saved as built: `auto` resolved
    with pytest.raises(Exception):
        spec.seed = 8                      # frozen
    cfg.bottleneck.width = 16              # a copy: the spec of a built model does not follow the config
    assert spec.code_width == 8 and cfg.spec.code_width == 16
    with pytest.raises(ConfigError, match=r"^invalid config: precision='fp8': allowed: \['fp32', 'bf16', 'fp16'\]"):
        ModelSpec.from_dict({**spec.to_dict(), "precision": "fp8"})


def test_a_transformers_config_keeps_only_the_spec():
    from resbm_ds.hf.modeling import ResBMHFConfig
    cfg = load_config(None, ["model.hidden_size=64", "bottleneck.width=4", "train.out_dir=/private/run"])
    for given in (cfg.spec.to_dict(), cfg.to_dict()):      # an export written before the spec: its whole Config
        hf = ResBMHFConfig(resbm=given)
        assert set(hf.resbm) == {"model", "bottleneck", "seed", "precision"} and "/private/run" not in str(hf.to_dict())
        assert hf.resbm_spec().to_dict() == cfg.spec.to_dict() and hf.hidden_size == 64
