"""Per-method training defaults: how they combine, scale with the batch, and fill a run config."""

from __future__ import annotations

import math

import pytest

import deltatune as dt
from deltatune.core.recipe import DEFAULT, REFERENCE_BATCH, Recipe, recipe_for
from deltatune.train.config import load_config
from tests.conftest import tiny_bert


def test_every_registered_method_declares_its_own_recipe():
    from deltatune.methods import config_classes

    missing = [name for name, cls in config_classes().items() if cls.recipe is DEFAULT and name != "gates"]
    assert missing == []


def test_one_method_gets_its_own_numbers():
    assert dt.recipe(dt.LoRA()) == dt.LoRA.recipe
    assert dt.recipe(dt.PromptTuning()).learning_rate == dt.PromptTuning.recipe.learning_rate


def test_a_mix_takes_the_smallest_learning_rate_and_ignores_gates():
    mixed = dt.recipe(dt.LoRA(), dt.PromptTuning(), dt.Adapter())
    rates = [dt.LoRA.recipe.learning_rate, dt.PromptTuning.recipe.learning_rate, dt.Adapter.recipe.learning_rate]
    assert mixed.learning_rate == min(rates)
    assert dt.recipe(dt.UniPELT()) == recipe_for([c for c in dt.UniPELT() if c.method != "gates"])


def test_whole_modules_alone_train_at_the_head_rate():
    head_only = dt.recipe(dt.TrainModules(modules=["classifier"]))
    assert head_only.learning_rate == dt.TrainModules.recipe.head_learning_rate


def test_recipe_of_an_attached_delta_equals_the_recipe_of_its_configs():
    delta = dt.attach(tiny_bert(), dt.LoRA(targets=["query"]), dt.BitFit())
    assert dt.recipe(delta) == recipe_for(delta.configs)


def test_recipe_rejects_what_is_not_a_method_config():
    with pytest.raises(dt.ConfigError, match="method configs"):
        dt.recipe("lora")


def test_batch_rule_shrinks_rates_for_small_batches_and_keeps_them_for_large_ones():
    r = Recipe(learning_rate=2e-3, head_learning_rate=1e-2)
    assert r.for_batch(REFERENCE_BATCH) == r
    assert r.for_batch(4 * REFERENCE_BATCH) == r  # never scaled up (measured: BENCHMARKS.md "Defaults")
    assert (r.for_batch(REFERENCE_BATCH // 4).learning_rate, r.for_batch(REFERENCE_BATCH // 4).head_learning_rate) \
        == (1e-3, 5e-3)
    assert r.for_batch(REFERENCE_BATCH // 2).learning_rate == 1.41e-3  # rounded to 3 significant digits


def test_run_config_fills_unset_keys_from_the_recipe():
    cfg = load_config(None, [("delta", [{"method": "prompt"}])], check_files=False)
    r = dt.PromptTuning.recipe
    assert cfg.train.learning_rate == pytest.approx(r.learning_rate, rel=1e-3)
    assert cfg.train.head_learning_rate == pytest.approx(r.head_learning_rate, rel=1e-3)
    assert (cfg.train.weight_decay, cfg.train.warmup_ratio) == (r.weight_decay, r.warmup_ratio)


def test_values_the_user_sets_win_over_the_recipe():
    cfg = load_config(None, [("train.learning_rate", 0.02), ("train.weight_decay", 0.1), ("train.warmup_ratio", 0.0)],
                      check_files=False)
    assert (cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.warmup_ratio) == (0.02, 0.1, 0.0)
    assert cfg.train.head_learning_rate == pytest.approx(dt.LoRA.recipe.head_learning_rate, rel=1e-3)


def test_global_batch_counts_accumulation_and_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, [("train.batch_size", 2), ("train.grad_accum", 2)], check_files=False)
    expected = dt.LoRA.recipe.learning_rate * math.sqrt(8 / REFERENCE_BATCH)  # 2 x 2 x 2 processes, not 2
    assert cfg.train.learning_rate == pytest.approx(expected, rel=1e-3)
