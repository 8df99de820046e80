"""LoRA+: ``train.loraplus_ratio`` puts LoRA's B matrices in their own optimizer group at ratio x the rate."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.methods.lora import LoRALinear
from deltatune.train.config import TrainConfig, fill_from_recipe
from deltatune.train.loop import build_optimizer
from tests.conftest import BUILDERS, batch


def _groups(optimizer) -> dict[str, tuple[float, set[int]]]:
    return {g["name"]: (g["lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups}


def test_b_matrices_get_their_own_group_at_ratio_times_the_rate():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(r=4, targets=["query", "value"]), train_modules=["classifier"])
    groups = _groups(build_optimizer(delta, TrainConfig(learning_rate=1e-3, head_learning_rate=1e-2,
                                                        loraplus_ratio=16.0, weight_decay=0.0)))
    wrappers = [w for w in delta.wrappers() if isinstance(w, LoRALinear)]
    assert groups["lora_B"] == (pytest.approx(1.6e-2), {id(w.lora_B) for w in wrappers})
    assert groups["delta"] == (1e-3, {id(w.lora_A) for w in wrappers})
    assert groups["head"][0] == 1e-2 and len(groups["head"][1]) == 2  # classifier weight and bias
    plain = _groups(build_optimizer(delta, TrainConfig(learning_rate=1e-3, loraplus_ratio=1.0, weight_decay=0.0)))
    assert set(plain) == {"delta", "head"} and len(plain["delta"][1]) == 2 * len(wrappers)


def test_one_adam_step_moves_b_ratio_times_further_than_a():
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.LoRA(r=4, targets=["q_proj"], init="gaussian"))
    module = model.model.layers[0].self_attn.q_proj
    a0 = module.lora_A.detach().clone()
    with torch.no_grad():  # B off zero, so that A gets a gradient too
        module.lora_B.normal_(std=0.1)
    b0 = module.lora_B.detach().clone()
    opt = build_optimizer(delta, TrainConfig(learning_rate=1e-3, loraplus_ratio=8.0, weight_decay=0.0))
    model(input_ids=batch(), labels=batch()).loss.backward()
    opt.step()
    # Adam's first step moves every entry with a gradient by ~lr (its sign): 1e-3 for A, 8e-3 for B
    assert (module.lora_A - a0).abs().max().item() == pytest.approx(1e-3, rel=1e-2)
    assert (module.lora_B - b0).abs().max().item() == pytest.approx(8e-3, rel=1e-2)


def test_a_delta_without_lora_is_refused_clearly():
    delta = dt.attach(BUILDERS["bert"](), dt.IA3(), train_modules=None)
    with pytest.raises(ConfigError, match="loraplus_ratio .* no LoRA"):
        build_optimizer(delta, TrainConfig(learning_rate=1e-3, loraplus_ratio=16.0, weight_decay=0.0))


def test_the_recipe_carries_the_ratio_and_the_user_value_wins():
    assert dt.recipe(dt.LoRA()).loraplus_ratio == 1.0  # off until a sweep measures a better default
    t = TrainConfig()
    fill_from_recipe(t, dt.recipe(dt.LoRA()))
    assert t.loraplus_ratio == 1.0
    t = TrainConfig(loraplus_ratio=16.0)
    fill_from_recipe(t, dt.recipe(dt.LoRA()))
    assert t.loraplus_ratio == 16.0


def test_deltatune_train_runs_lora_plus_and_logs_both_rates(tmp_path, tiny_bert_dir, sentiment_files):
    import yaml

    from deltatune.train import jobs
    from deltatune.train.config import load_config
    from deltatune.train.loop import MetricsLog
    from tests.train.conftest import base_overrides

    data = base_overrides(tiny_bert_dir, sentiment_files[0], sentiment_files[1], tmp_path / "run", tmp_path / "cache")
    data["train"].update(max_steps=4, loraplus_ratio=16.0, schedule="constant")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    jobs.train(load_config(tmp_path / "c.yaml"))
    train = [r for r in MetricsLog.read(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert train and all(r["lora_B_lr"] == pytest.approx(16 * r["lr"]) and r["head_lr"] == 0.01 for r in train)
