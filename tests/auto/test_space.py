"""The search: section: parsing, up-front validation with clear errors, define-by-run sampling."""

from __future__ import annotations

import json

import optuna
import pytest

from deltatune.auto.space import Param, parse_param, parse_search, split_sections
from deltatune.core.errors import ConfigError

BASE = {"delta": [{"method": "lora", "r": 8, "targets": ["query", "value"]}], "train": {"max_steps": 10}}


def test_parse_param_kinds():
    assert parse_param("lora.r", [4, 8]) == Param("lora.r", "categorical", (4, 8))
    assert parse_param("lora.r", {"choices": [4]}) == Param("lora.r", "categorical", (4,))
    assert parse_param("adapter.bottleneck", {"low": 8, "high": 64, "log": True}) == \
        Param("adapter.bottleneck", "int", low=8, high=64, log=True)
    lr = parse_param("train.learning_rate", {"low": 1e-4, "high": 3e-3, "log": True})
    assert lr.kind == "float" and lr.probes() == [1e-4, 3e-3]
    assert parse_param("lora.r", {"low": 2, "high": 8, "type": "float"}).kind == "float"
    assert parse_param("data.max_length", 64) == Param("data.max_length", "fixed", value=64)


def test_yaml_exponents_without_a_dot_are_numbers():
    import yaml

    space = yaml.safe_load("{lr: {low: 1e-4, high: 3e-3, log: true}, wd: [0, 1e-2]}")
    assert space["lr"]["low"] == "1e-4"  # PyYAML's YAML 1.1 reading, which the parser corrects
    assert parse_param("train.learning_rate", space["lr"]) == Param("train.learning_rate", "float", low=1e-4,
                                                                  high=3e-3, log=True)
    assert parse_param("train.weight_decay", space["wd"]).choices == (0, 0.01)
    assert parse_param("method", ["lora", "1x"]).choices == ("lora", "1x")


def test_list_choices_are_stored_as_json_labels():
    p = parse_param("lora.targets", [["query", "value"], ["query", "key", "value"]])
    assert p.labels() == ['["query", "value"]', '["query", "key", "value"]']
    trial = optuna.trial.FixedTrial({"lora.targets": '["query", "key", "value"]'})
    assert p.suggest(trial) == ["query", "key", "value"]
    assert parse_param("lora.r", [4, 8]).labels() == [4, 8]  # primitives stay themselves
    mixed = parse_param("lora.targets", [["query", "value"], "all-linear"])  # a list and a string
    assert mixed.labels() == ['["query", "value"]', '"all-linear"']
    assert mixed.suggest(optuna.trial.FixedTrial({"lora.targets": '"all-linear"'})) == "all-linear"
    assert mixed.label("all-linear") == '"all-linear"'


@pytest.mark.parametrize("spec,message", [
    ([], "the list of choices is empty"),
    ({"low": 3, "high": 3}, "low must be < high"),
    ({"low": 0.0, "high": 1.0, "log": True}, "a log range needs low > 0"),
    ({"low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}, "cannot be combined with log"),
    ({"low": 1, "high": 4, "type": "int", "step": 0.5}, "needs whole numbers"),
    ({"min": 1, "max": 4}, r"a range is \{low"),
    ({"low": "a", "high": 4}, "finite numbers"),
    ({"low": 1, "high": 4, "type": "str"}, "type must be int or float"),
])
def test_bad_ranges_fail_with_the_key(spec, message):
    with pytest.raises(ConfigError, match=rf"search\.space\.lora\.r.*{message}"):
        parse_param("lora.r", spec)


@pytest.mark.parametrize("section,message", [
    ({"space": {"lora.alpah": [4]}}, r"lora has no field 'alpah' \(did you mean lora\.alpha\?\)\. Fields: r, alpha"),
    ({"space": {"lora.r": [4, 0]}}, r"search\.space\.lora\.r: the value 0 is not valid: lora\.r must be a positive"),
    ({"space": {"train.lr": [1e-3]}}, r"not a searchable key \(did you mean 'train\.learning_rate'\?\)"),
    ({"space": {"train.batch_size": [8, 0]}}, r"the value 0 is not valid: .*train\.batch_size"),
    ({"space": {"method": ["lora", "loraa"]}}, r"unknown method\(s\) \['loraa'\]"),
    ({"space": {"adapter.bottleneck": [8]}}, "method 'adapter' is never used"),
    ({"space": {"lorra.r": [8]}}, "'lorra' is neither a method nor a config section; did you mean 'lora'"),
    ({"space": {"delta": [[]]}}, "not a searchable key"),
    ({"space": {"train": [1]}}, "not a searchable key"),
    ({"space": {}}, "needs a 'space' mapping"),
    ({"space": {"lora.r": [4]}, "lora.r": [8]}, r"unknown option\(s\) \['lora\.r'\].*parameters go under search"),
    ({"space": {"lora.r": [4]}, "pruner": "hyperband"}, "search.pruner must be one of"),
    ({"space": {"lora.r": [4]}, "enqueue": [{"lora.r": 16}]}, r"16 is not one of the choices of lora\.r"),
    ({"space": {"lora.r": [4]}, "enqueue": [{"lora.alpha": 16}]}, r"\['lora\.alpha'\] are not parameters"),
    ({"space": {"train.learning_rate": {"low": 1e-3, "high": 1e-2}}, "enqueue": [{"train.learning_rate": 1.0}]},
     r"outside \[0\.001, 0\.01\]"),
])
def test_search_section_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_search(section, BASE)


def test_split_sections_and_methods_alias():
    base, sections = split_sections({"methods": [{"method": "ia3"}], "search": {"space": {}}, "seed": 1}, "search")
    assert base == {"delta": [{"method": "ia3"}], "seed": 1} and sections == {"search": {"space": {}}}


def test_method_fields_are_sampled_only_for_the_chosen_method():
    settings = parse_search({"space": {
        "method": ["lora", "adapter"], "lora.r": [2, 4], "adapter.bottleneck": {"low": 4, "high": 16},
        "train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "data.max_length": 32}}, BASE)
    values = settings.sample(optuna.trial.FixedTrial({"method": "adapter", "adapter.bottleneck": 9,
                                                      "train.learning_rate": 1e-3}))
    assert values == {"method": "adapter", "adapter.bottleneck": 9, "train.learning_rate": 1e-3,
                      "data.max_length": 32}
    assert settings.overrides(values) == [("delta", [{"method": "adapter", "bottleneck": 9}]),
                                          ("train.learning_rate", 1e-3), ("data.max_length", 32)]
    # lora keeps the base config's other fields (targets) and gets the searched rank
    lora = settings.sample(optuna.trial.FixedTrial({"method": "lora", "lora.r": 2, "train.learning_rate": 1e-3}))
    assert settings.delta_for(lora) == [{"method": "lora", "r": 2, "targets": ["query", "value"]}]


def test_without_method_the_base_delta_is_searched():
    base = {"delta": [{"method": "lora", "r": 8}, {"method": "ia3"}]}
    settings = parse_search({"space": {"lora.r": [2, 4]}}, base)
    values = settings.sample(optuna.trial.FixedTrial({"lora.r": 4}))
    assert settings.delta_for(values) == [{"method": "lora", "r": 4}, {"method": "ia3"}]


def test_sampling_with_a_real_study_is_conditional():
    settings = parse_search({"space": {"method": ["lora", "bitfit"], "lora.r": [2, 4]}, "seed": 0}, BASE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(12):
        trial = study.ask()
        seen.append(settings.sample(trial))
        study.tell(trial, 0.0)
    assert {v["method"] for v in seen} == {"lora", "bitfit"}
    assert all(("lora.r" in v) == (v["method"] == "lora") for v in seen)
    assert all(("lora.r" in t.params) == (t.params["method"] == "lora") for t in study.trials)


def test_enqueued_params_use_labels():
    settings = parse_search({"space": {"lora.targets": [["query"], ["value"]], "lora.r": [2, 4], "seed": 3},
                             "enqueue": [{"lora.targets": ["value"], "lora.r": 4}]}, BASE)
    assert settings.enqueued_params() == [{"lora.targets": json.dumps(["value"]), "lora.r": 4}]
