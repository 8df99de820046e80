"""Config validation: every mistake fails before any model is loaded, naming the key path and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deltatune.core.errors import ConfigError
from deltatune.train.config import (
    RunConfig,
    all_keys,
    apply_overrides,
    dump_yaml,
    load_config,
    parse_overrides,
    read_yaml,
)
from deltatune.train.router_job import is_router_config, load_router_config


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text: str, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides, check_files=False)
    return str(info.value)


def test_unknown_top_level_key_names_it_and_suggests_the_real_one(tmp_path):
    msg = error_of(tmp_path, "lerning_rate: 0.1\n")
    assert "unknown key 'lerning_rate'" in msg
    assert "did you mean 'train.learning_rate'" in msg
    assert "Allowed keys at the top level: data, delta, model" in msg


def test_unknown_nested_key_lists_the_section_keys(tmp_path):
    msg = error_of(tmp_path, "train:\n  epocs: 2\n")
    assert "unknown key 'train.epocs'; did you mean 'train.epochs'?" in msg
    assert "Allowed keys in train:" in msg and "batch_size" in msg


def test_wrong_type_names_path_and_value(tmp_path):
    msg = error_of(tmp_path, "train:\n  batch_size: abc\n")
    assert "train.batch_size: input should be a valid integer" in msg and "'abc'" in msg


@pytest.mark.parametrize("text, expected", [
    ("train:\n  schedule: cos\n", "train.schedule: input should be 'linear', 'cosine' or 'constant'"),
    ("train:\n  batch_size: 0\n", "train.batch_size: input should be greater than 0"),
    ("train:\n  warmup_ratio: 1.5\n", "train.warmup_ratio: input should be less than 1"),
    ("train:\n  eval_every: 0\n", "train.eval_every: must be 'epoch', 'never' or a positive number of steps"),
    ("train:\n  device: gpu\n", "train.device: must be auto, cpu, cuda, cuda:N or mps"),
    ("task: regression\n", "task: input should be 'classification', 'causal_lm', 'instruction', 'chat' or 'dpo'"),
    ("data:\n  columns:\n    txt: review\n", "unknown key 'data.columns.txt'; did you mean 'data.columns.text'?"),
    ("train:\n  metric: perplexity\n", "train.metric must be one of accuracy, f1, mcc, loss"),
])
def test_impossible_values_name_the_key_and_the_allowed_values(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_several_problems_are_reported_together(tmp_path):
    msg = error_of(tmp_path, "train:\n  batch_size: -1\n  schedule: x\nseed: nope\n")
    assert "train.batch_size" in msg and "train.schedule" in msg and "seed" in msg


def test_method_fields_are_validated_up_front_with_their_index(tmp_path):
    msg = error_of(tmp_path, "delta:\n  - {method: lora, r: 8}\n  - {method: lora, r: 0}\n")
    assert msg.startswith("delta[1]: lora.r must be a positive integer, got 0")
    msg = error_of(tmp_path, "delta:\n  - {method: lora, rank: 8}\n")
    assert "delta[0]: lora: unknown field(s) ['rank']" in msg and "'r'" in msg
    msg = error_of(tmp_path, "delta:\n  - {method: loraa}\n")
    assert "delta[0]: unknown method 'loraa'; known methods:" in msg and "lora" in msg
    assert error_of(tmp_path, "delta: [{method: lora, alpha: x}]\n").startswith("delta[0]: lora.alpha must be")
    assert "the list is empty" in error_of(tmp_path, "delta: []\n")


def test_methods_is_an_alias_and_a_single_mapping_is_a_list(tmp_path):
    cfg = load_config(write(tmp_path, "methods: {method: lora, r: 2}\n"), check_files=False)
    assert cfg.delta[0]["method"] == "lora" and cfg.delta[0]["r"] == 2
    assert cfg.delta[0]["alpha"] == 16.0  # resolved: every field spelled out
    assert "keep one of them" in error_of(tmp_path, "methods: [{method: lora}]\ndelta: [{method: lora}]\n")


def test_overrides_parse_as_yaml_values():
    pairs = parse_overrides(["--train.max_steps", "20", "--seed=3", "--delta.0.targets", "[query, value]",
                             "--model.path", "null", "--train.learning-rate", "1e-3"])
    assert pairs == [("train.max_steps", 20), ("seed", 3), ("delta.0.targets", ["query", "value"]),
                     ("model.path", None), ("train.learning_rate", "1e-3")]
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--train.max_steps"])
    with pytest.raises(ConfigError, match="unexpected argument 'oops'"):
        parse_overrides(["--seed", "1", "oops"])


def test_overrides_reach_nested_keys_list_items_and_the_default_delta():
    data = apply_overrides({"train": {"epochs": 1}},
                           [("train.max_steps", 5), ("delta.0.r", 2), ("data.columns.text", "x")])
    assert data["train"] == {"epochs": 1, "max_steps": 5}
    assert data["delta"][0]["r"] == 2 and data["data"]["columns"]["text"] == "x"
    with pytest.raises(ConfigError, match=r"delta.3.r: '3' is not an index of this list \(it has 1 item"):
        apply_overrides({}, [("delta.3.r", 2)])
    with pytest.raises(ConfigError, match="cannot set seed.x.y: seed.x is a value, not a section"):
        apply_overrides({"seed": {"x": 1}}, [("seed.x.y", 2)])


def test_overrides_are_validated_like_the_file(tmp_path):
    msg = error_of(tmp_path, "seed: 1\n", [("train.batch_sise", 4)])
    assert "unknown key 'train.batch_sise'; did you mean 'train.batch_size'?" in msg


def test_embedded_default_resolves_model_data_and_paths():
    cfg = load_config()
    assert cfg.task == "classification" and cfg.run_name == "default" and cfg.output_dir == "runs/default"
    assert cfg.data.train.endswith("deltatune/data/sentiment_train.tsv")
    assert cfg.data.validation.endswith("deltatune/data/sentiment_dev.tsv")
    assert cfg.model.path and cfg.train.metric == "accuracy"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, [("train.max_steps", 3), ("delta.0.targets", ["query"])])
    again = load_config(write(tmp_path, dump_yaml(cfg)))
    assert again.to_dict() == {**cfg.to_dict(), "run_name": "default"}
    assert yaml.safe_load(dump_yaml(cfg))["train"]["max_steps"] == 3


def test_missing_files_fail_before_loading_anything(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train: no such file '.*nope.tsv'.*data.format: hub"):
        load_config(None, [("data.train", str(tmp_path / "nope.tsv")), ("data.validation", None)])
    with pytest.raises(ConfigError, match="model.path: no such directory"):
        load_config(None, [("model.path", str(tmp_path / "missing-model"))])
    with pytest.raises(ConfigError, match="config file .* does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_language_model_tasks_need_their_own_model_and_data(tmp_path):
    with pytest.raises(ConfigError, match="data.train is required for task causal_lm"):
        load_config(write(tmp_path, "task: causal_lm\nmodel: {path: .}\n"))
    msg = error_of(tmp_path, "task: instruction\ndata: {train: x.json}\n")
    assert "model.path is required for task instruction" in msg


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_yaml(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(write(tmp_path, "a: [\n"))
    assert read_yaml(write(tmp_path, "")) == {}


def test_key_listing_covers_nested_sections():
    keys = all_keys()
    assert {"train.learning_rate", "data.columns.text_pair", "model.path", "delta"} <= set(keys)
    assert set(RunConfig.model_fields) <= set(keys)


@pytest.mark.parametrize("example", sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_configs_are_valid(example):
    if is_router_config(example):  # `deltatune train` runs a router job for these (train/router_job.py)
        assert load_router_config(example).output_dir == f"runs/{example.stem}"
        return
    cfg = load_config(example, check_files=False)
    assert cfg.delta and cfg.output_dir == f"runs/{example.stem}"
