import pytest

from qwen_zero_prior.training.config import ATTENTION_TARGETS, MLP_TARGETS, Config, ConfigError, field_spec


def test_defaults():
    cfg = Config()
    assert cfg.train.train_placeholder_token is False
    assert cfg.train.placeholder_token == "<zwx>"
    assert cfg.train.placeholder_init_std == 1e-5
    assert cfg.train.alpha == cfg.train.rank
    assert cfg.debug.log_prompt_ids is False
    assert cfg.model.quantize is False and cfg.model.quantize_te is False
    assert set(ATTENTION_TARGETS) <= set(cfg.train.lora_targets)
    assert {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= set(cfg.train.lora_targets)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "model:\n  base_model: /models/qwen\n  quantize: true\n"
        "train:\n  train_placeholder_token: true\n  placeholder_token: '<sks>'\n  placeholder_init_std: 0\n"
        "  lora_targets: attention+mlp\n  steps: 10\n"
        "debug:\n  log_prompt_ids: true\n"
    )
    cfg = Config.from_yaml(p, ["train.steps=25", "train.rank=8", "sample.prompts=[a, b]"])
    assert cfg.model.quantize is True
    assert cfg.train.placeholder_token == "<sks>"
    assert cfg.train.placeholder_init_std == 0.0
    assert cfg.train.steps == 25 and cfg.train.rank == 8 and cfg.train.alpha == 8.0
    assert cfg.train.lora_targets == list(ATTENTION_TARGETS + MLP_TARGETS)
    assert cfg.sample.prompts == ["a", "b"]
    assert cfg.debug.log_prompt_ids is True


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"train": {"stepz": 3}}, "unknown key train.stepz"),
        ({"trian": {}}, "unknown section 'trian'"),
        ({"train": {"placeholder_init_std": -0.1}}, "-0.1"),
        ({"train": {"steps": 0}}, "train.steps must be >= 1, got 0"),
        ({"train": {"steps": "many"}}, "'many'"),
        ({"train": {"rank": 2.5}}, "2.5"),
        ({"train": {"resolution": 1000}}, "multiple of 16, got 1000"),
        ({"train": {"placeholder_token": "two words"}}, "'two words'"),
        ({"train": {"lora_targets": []}}, "lora_targets"),
        ({"model": {"dtype": "fp64"}}, "'fp64'"),
        ({"train": {"weighting_scheme": "bogus"}}, "'bogus'"),
        ({"train": {"train_placeholder_token": "maybe"}}, "'maybe'"),
        ({"train": {"learning_rate": float("nan")}}, "finite"),
        ({"train": {"dp_allreduce": "ddp"}}, "train.dp_allreduce must be one of ['flat', 'overlap'], got 'ddp'"),
        ({"model": {"compile": True, "compile_mode": "reduce-overhead", "offload": True}},
         "reduce-overhead (CUDA graphs) crashes with gradient checkpointing"),
        ({"model": {"compile": True, "compile_mode": "max-autotune", "gradient_checkpointing": True}},
         "max-autotune captures CUDA graphs, which crash with gradient checkpointing"),
    ],
)
def test_bad_config_refused(data, needle):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(data)
    assert needle in str(e.value)


def test_quantized_text_encoder_refused_with_token_training():
    with pytest.raises(ConfigError, match="Set `quantize_te: false`"):
        Config.from_dict({"model": {"quantize_te": True}, "train": {"train_placeholder_token": True}})
    # either alone is fine
    Config.from_dict({"model": {"quantize_te": True}})
    Config.from_dict({"model": {"quantize": True}, "train": {"train_placeholder_token": True}})


def test_bad_yaml_and_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(p)
    p.write_text("- a\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        Config.from_yaml(p)
    ok = tmp_path / "ok.yaml"
    ok.write_text("train: {}\n")
    with pytest.raises(ConfigError, match="section.key=value"):
        Config.from_yaml(ok, ["steps=3"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.from_yaml(tmp_path / "missing.yaml")


def test_field_spec_single_source():
    spec = field_spec("train", "placeholder_init_std")
    assert spec["default"] == 1e-5 and spec["min"] == 0.0 and "help" in spec
    assert field_spec("train", "steps")["min"] == 1


def test_replace_validates():
    cfg = Config().replace(train={"steps": 7})
    assert cfg.train.steps == 7
    with pytest.raises(ConfigError):
        Config().replace(train={"steps": -1})


def test_override_errors_name_the_override_not_the_yaml(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("train:\n  steps: 3\n")
    with pytest.raises(ConfigError) as e:
        Config.from_yaml(ok, ["train.step=5"])
    msg = str(e.value)
    assert msg.startswith("--set train.step=5: unknown key train.step") and str(ok) not in msg
    assert "steps" in msg  # the known keys are listed
    with pytest.raises(ConfigError, match=r"^--set trian.steps=5: unknown section 'trian'"):
        Config.from_yaml(ok, ["trian.steps=5"])
    # the YAML's own mistakes still name the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=f"^{bad}: unknown key train.stepz"):
        Config.from_yaml(bad, ["train.steps=5"])


def test_keep_checkpoints_field():
    assert Config().train.keep_checkpoints == 2
    assert Config.from_dict({"train": {"keep_checkpoints": 0}}).train.keep_checkpoints == 0
    with pytest.raises(ConfigError, match="train.keep_checkpoints must be >= 0"):
        Config.from_dict({"train": {"keep_checkpoints": -1}})
