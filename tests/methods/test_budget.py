"""Adaptive LoRA rank budget: schedule, importance, allocation, and the trained delta as a plain LoRA."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltatune as dt
from deltatune.core.config import config_from_dict
from deltatune.core.inject import DeltaWrapper
from deltatune.methods import config_classes
from deltatune.methods.lora.budget import Importance, allocate, budget_at, component_scores, rank_allocators
from tests.conftest import BUILDERS, batch, logits

QKV = ["query", "key", "value"]
LABELS = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])


def ids() -> torch.Tensor:
    return batch(seed=1, size=8, length=12)


def loss_of(model) -> torch.Tensor:
    x = ids()
    if hasattr(model, "classifier"):
        return model(input_ids=x, labels=LABELS).loss
    return model(input_ids=x, labels=x).loss


def train(model, delta, steps: int, call_step: bool = True, lr: float = 5e-3, keep_loss: bool = False):
    """Adam on everything trainable; ``delta.step(i)`` after each step unless ``call_step`` is False."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    alive = []  # keep_loss: the graphs stay referenced, as in a loop that keeps `loss` for logging
    for i in range(steps):
        opt.zero_grad()
        new_loss = loss_of(model)  # with keep_loss the previous step's graph is still alive here
        new_loss.backward()
        opt.step()
        if call_step:
            delta.step(i)
        if keep_loss:
            alive.append(new_loss)
    return opt


def adaptive_bert(target: int = 12, start: int = 5, end: int = 40, **kwargs):
    model = BUILDERS["bert"]()
    budget = dt.RankBudget(target_total=target, start=start, end=end, **kwargs)
    delta = dt.attach(model, dt.LoRA(r=8, targets=QKV, adaptive=budget), train_modules=["classifier"])
    return model, delta


# -- pure parts --------------------------------------------------------------------------------------------

def test_schedule_values_and_shape():
    # hand-computed: 12 + floor(1000 * (1 - 5/10)^3) = 12 + 125
    assert budget_at(5, 1012, 12, 0, 10) == 137
    assert budget_at(0, 1012, 12, 0, 10) == 1012 and budget_at(10, 1012, 12, 0, 10) == 12
    values = [budget_at(t, 48, 12, 5, 40) for t in range(60)]
    assert values[:6] == [48] * 6 and values[40:] == [12] * 20
    assert all(a >= b for a, b in zip(values, values[1:])), "schedule must never grow"
    assert values[6] < 48  # pruning starts right after start


def test_importance_ema_by_hand():
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    imp = Importance(beta1=0.5, beta2=0.5)
    imp.update(w)  # no gradient yet: nothing recorded
    assert imp.score() is None
    w.grad = torch.tensor([0.5, 3.0])  # |w * g| = [1, 3]
    imp.update(w)
    # sensitivity = 0.5 * [1, 3]; uncertainty = 0.5 * |[1, 3] - [0.5, 1.5]|; score = product
    assert torch.allclose(imp.sensitivity, torch.tensor([0.5, 1.5]))
    assert torch.allclose(imp.uncertainty, torch.tensor([0.25, 0.75]))
    assert torch.allclose(imp.score(), torch.tensor([0.125, 1.125]))


def test_component_scores_row_of_a_plus_column_of_b():
    score_a = torch.tensor([[1.0, 3.0, 5.0], [0.0, 0.0, 3.0]])  # (r=2, in=3): row means 3, 1
    score_b = torch.tensor([[2.0, 0.0], [4.0, 2.0]])            # (out=2, r=2): column means 3, 1
    assert torch.equal(component_scores(score_a, score_b, 2), torch.tensor([6.0, 2.0]))
    assert torch.equal(component_scores(None, None, 3), torch.zeros(3))


def test_allocate_keeps_global_best_and_floors():
    scores = {"a": torch.tensor([9.0, 8.0, 0.1]), "b": torch.tensor([0.5, 0.2, 0.3])}
    keep = allocate(scores, budget=3)
    assert keep["a"].tolist() == [True, True, False] and keep["b"].tolist() == [True, False, False]
    keep = allocate(scores, budget=3, min_rank=1)  # b keeps its best; a gets the two best of the rest
    assert keep["a"].tolist() == [True, True, False] and keep["b"].tolist() == [True, False, False]
    keep = allocate(scores, budget=2, min_rank=1)
    assert keep["a"].tolist() == [True, False, False] and keep["b"].tolist() == [True, False, False]
    ties = allocate({"a": torch.zeros(2), "b": torch.zeros(2)}, budget=3)
    assert ties["a"].tolist() == [True, True] and ties["b"].tolist() == [True, False]  # earlier wins ties


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=6), min_size=1, max_size=5),
       st.integers(0, 2), st.data())
def test_allocate_properties(ranks, min_rank, data):
    scores = {f"m{i}": torch.tensor(s) for i, s in enumerate(ranks)}
    floor = sum(min(min_rank, len(s)) for s in ranks)
    budget = data.draw(st.integers(floor, sum(len(s) for s in ranks)))
    keep = allocate(scores, budget, min_rank)
    assert sum(int(k.sum()) for k in keep.values()) == budget
    for path, s in scores.items():
        assert int(keep[path].sum()) >= min(min_rank, len(s))
    if min_rank == 0:  # without floors every kept score beats every dropped one
        kept = [float(s[i]) for p, s in scores.items() for i in range(len(s)) if keep[p][i]]
        dropped = [float(s[i]) for p, s in scores.items() for i in range(len(s)) if not keep[p][i]]
        assert not kept or not dropped or min(kept) >= max(dropped)


# -- config ------------------------------------------------------------------------------------------------

def test_config_round_trips_through_dict_and_json():
    cfg = dt.LoRA(r=6, adaptive=dt.RankBudget(target_total=10, start=2, end=9, min_rank=1))
    data = json.loads(json.dumps(cfg.to_dict()))
    again = config_from_dict(data, config_classes())
    assert again == cfg and isinstance(again.adaptive, dt.RankBudget)
    assert "adaptive" in cfg.describe()


@pytest.mark.parametrize("kwargs,field", [
    (dict(target_total=0, start=0, end=5), "target_total"),
    (dict(target_total=4, start=5, end=5), "end"),
    (dict(target_total=4, start=-1, end=5), "start"),
    (dict(target_total=4, start=0, end=5, beta1=1.0), "beta1"),
    (dict(target_total=4, start=0, end=5, advance="sometimes"), "advance"),
    (dict(target_total=4, start=0, end=5, interval=0), "interval"),
])
def test_budget_errors_name_the_field(kwargs, field):
    with pytest.raises(dt.ConfigError, match=rf"lora\.adaptive\.{field} must be"):
        dt.RankBudget(**kwargs)


def test_adaptive_dict_errors():
    with pytest.raises(dt.ConfigError, match=r"unknown key\(s\) \['target'\].*missing key\(s\) \['target_total'\]"):
        dt.LoRA(adaptive={"target": 3, "start": 0, "end": 4})
    with pytest.raises(dt.ConfigError, match="lora.adaptive must be a dt.RankBudget"):
        dt.LoRA(adaptive=12)


def test_infeasible_target_fails_at_attach_and_leaves_model_alone():
    model = BUILDERS["bert"]()
    before = logits(model)
    with pytest.raises(dt.ConfigError, match=r"target_total must be <= the total initial rank 48 \(6 modules\)"):
        dt.attach(model, dt.LoRA(r=8, targets=QKV, adaptive=dt.RankBudget(target_total=49, start=0, end=5)))
    with pytest.raises(dt.ConfigError, match="min_rank must be <= target_total / modules = 1"):
        dt.attach(model, dt.LoRA(r=8, targets=QKV, adaptive=dt.RankBudget(target_total=6, start=0, end=5,
                                                                           min_rank=2)))
    assert not any(isinstance(m, DeltaWrapper) for m in model.modules())
    assert torch.equal(logits(model), before)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no hook left behind to trip over
    opt.step()


# -- training ----------------------------------------------------------------------------------------------

def test_total_rank_follows_schedule_and_hits_target_exactly_at_end():
    model, delta = adaptive_bert(target=12, start=5, end=40)
    allocator = rank_allocators(delta)[0]
    train(model, delta, 40)  # steps 0..39: one short of the end
    steps = [h[0] for h in allocator.history]
    assert steps == list(range(40))
    for step, scheduled, total in allocator.history:
        assert total == scheduled == budget_at(step, 48, 12, 5, 40)
    assert not allocator.finalized and delta.configs[0].adaptive is not None
    delta.step(39)  # the same index again: not counted twice
    assert len(allocator.history) == 40
    delta.step(40)
    assert allocator.finalized and allocator.total_rank() == 12
    ranks = delta.configs[0].rank_pattern
    every = [ranks.get(path, 0) for path in allocator.initial]  # dropped modules count as rank 0
    assert sum(every) == 12 and len(set(every)) > 1, ranks  # reallocated, not a uniform 2 per module
    for path, wrapper in delta.attachments[0].wrappers().items():
        assert wrapper.lora_A.shape[0] == wrapper.lora_B.shape[1] == ranks[path] == wrapper.r


def test_masked_components_have_no_effect_and_come_back_with_their_values():
    model, delta = adaptive_bert(target=12, start=2, end=30)
    allocator = rank_allocators(delta)[0]
    train(model, delta, 10)
    path, mask = next((p, m) for p, m in allocator.masks.items() if not m.all())
    wrapper = allocator.wrappers[path]
    assert torch.all(wrapper.lora_B[:, ~mask] == 0)
    saved = allocator._kept_b[path][:, ~mask].clone()
    assert saved.abs().sum() > 0  # the values it had when pruned are kept aside
    # the component's effect is exactly zero: dropping its row of A too changes nothing
    before = logits(model)
    with torch.no_grad():
        a = wrapper.lora_A.clone()
        wrapper.lora_A[~mask] = 0
        assert torch.equal(logits(model), before)
        wrapper.lora_A.copy_(a)
    # an allocation that gives the components back restores their values
    allocator._reallocate(sum(allocator.initial.values()))
    assert allocator.masks[path].all() and torch.equal(wrapper.lora_B[:, ~mask], saved)


def test_optimizer_hook_advances_without_any_change_to_the_loop():
    model, delta = adaptive_bert(target=12, start=3, end=20)
    allocator = rank_allocators(delta)[0]
    opt = train(model, delta, 25, call_step=False, keep_loss=True)  # a loop that knows nothing about budgets
    assert [h[0] for h in allocator.history] == list(range(21))  # advanced per step, finished at 20
    assert allocator.finalized and allocator.total_rank() == 12
    # training went on after truncation with the same Parameter objects and sliced Adam state
    params = dict(delta.parameters())
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            assert state["exp_avg"].shape == p.shape == state["exp_avg_sq"].shape
    assert set(map(id, params.values())) <= {id(p) for g in opt.param_groups for p in g["params"]}


def test_manual_mode_and_explicit_step_switch_off_the_hook():
    model, delta = adaptive_bert(target=12, start=3, end=20, advance="manual")
    allocator = rank_allocators(delta)[0]
    train(model, delta, 5, call_step=False)
    assert allocator.history == []
    model, delta = adaptive_bert(target=12, start=3, end=20)
    allocator = rank_allocators(delta)[0]
    train(model, delta, 5, call_step=True)  # hook counts step 0, then delta.step(0) takes over: no double count
    assert [h[0] for h in allocator.history] == [0, 1, 2, 3, 4] and allocator.manual


def test_finalize_keeps_outputs_merges_exports_and_reloads(tmp_path):
    peft = pytest.importorskip("peft")
    model, delta = adaptive_bert(target=10, start=3, end=25)
    train(model, delta, 25)
    before = logits(model)
    delta.finalize()
    assert torch.allclose(logits(model), before, atol=1e-6)  # truncation drops only masked components
    assert delta.configs[0].adaptive is None and sum(delta.configs[0].rank_pattern.values()) == 10
    delta.save(tmp_path / "delta")
    fresh = BUILDERS["bert"]()
    again = dt.load(fresh, tmp_path / "delta")
    assert torch.equal(logits(fresh), logits(model))  # same modules, same scale: bit for bit
    assert again.configs[0] == delta.configs[0] and not again.attachments[0].controllers
    dt.export_peft(delta, tmp_path / "peft")
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["rank_pattern"] == delta.configs[0].rank_pattern
    assert sorted(exported["target_modules"]) == sorted(delta.configs[0].rank_pattern)
    loaded = peft.PeftModel.from_pretrained(BUILDERS["bert"](), tmp_path / "peft").eval()
    assert torch.allclose(logits(loaded), before, atol=1e-5)
    delta.merge()
    assert torch.allclose(logits(model), before, atol=1e-5)
    delta.unmerge()  # base weights now within float rounding of the original


@pytest.mark.parametrize("arch,targets", [("gpt2", ["c_attn", "c_proj"]), ("llama", ["embed_tokens", "q_proj"])])
def test_conv1d_and_embedding_truncate_and_export(tmp_path, arch, targets):
    peft = pytest.importorskip("peft")
    model = BUILDERS[arch]()
    budget = dt.RankBudget(target_total=7, start=2, end=12, min_rank=1)
    delta = dt.attach(model, dt.LoRA(r=4, targets=targets, adaptive=budget))
    train(model, delta, 13, lr=1e-2)
    ranks = delta.configs[0].rank_pattern
    assert sum(ranks.values()) == 7 and min(ranks.values()) >= 1
    dt.export_peft(delta, tmp_path / "p")
    loaded = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "p").eval()
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)


def test_early_finalize_prunes_to_target_with_a_warning(caplog):
    model, delta = adaptive_bert(target=12, start=5, end=40)
    train(model, delta, 8)
    with caplog.at_level(logging.WARNING, logger="deltatune.methods.lora.budget"):
        delta.finalize()
    assert "before its end step 40" in caplog.text
    assert rank_allocators(delta)[0].total_rank() == 12
    delta.step(9)  # a finalized budget ignores further steps
    assert sum(delta.configs[0].rank_pattern.values()) == 12


def test_module_pruned_to_rank_zero_is_removed_everywhere():
    model = BUILDERS["bert"]()
    budget = dt.RankBudget(target_total=2, start=1, end=6)
    delta = dt.attach(model, dt.LoRA(r=2, targets=QKV, adaptive=budget), train_modules=["classifier"])
    opt = train(model, delta, 7, lr=1e-2)
    kept = delta.configs[0].rank_pattern
    assert sum(kept.values()) == 2 and len(kept) < 6
    dropped = [p for p in rank_allocators(delta)[0].initial if p not in kept]
    for path in dropped:
        assert not isinstance(model.get_submodule(path), DeltaWrapper)
    live = {id(p) for p in delta.parameters().values()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == live
    delta.detach()
    assert not any(isinstance(m, DeltaWrapper) for m in model.modules())


def test_detach_removes_the_optimizer_hook():
    model, delta = adaptive_bert()
    allocator = rank_allocators(delta)[0]
    params = list(delta.parameters().values())
    delta.detach()
    opt = torch.optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert allocator.history == []
