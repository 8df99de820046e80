"""dt.LoRA(init="corda"): started by dt.eva_init from W and its inputs' covariance; the residual stays in the base."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.inject import named_base_parameters
from deltatune.methods.lora.corda import corda_factors
from tests.conftest import BUILDERS, batch, logits, perturb
from tests.methods.peft_check import export_matches_peft, outputs


def _batches(padded: bool = True):
    """Two 3-sample batches; the first pads its first sample after 7 tokens."""
    found = []
    for seed in (1, 2):
        mask = torch.ones(3, 11, dtype=torch.long)
        if padded and seed == 1:
            mask[0, 7:] = 0
        found.append({"input_ids": batch(seed=seed), "attention_mask": mask})
    return found


def _query(model):
    return model.bert.encoder.layer[0].attention.self.query


def _covariance(model, module, batches) -> torch.Tensor:
    """PEFT's statistic by hand: the mean over samples of X^T X / max(X)^2 (unpadded rows of one sample)."""
    samples = []
    handle = module.register_forward_pre_hook(lambda m, args: samples.append(args[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
            x = samples.pop()
            samples.extend(x[i][b["attention_mask"][i].bool()] for i in range(len(x)))
    handle.remove()
    return sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in samples) / len(samples)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_w_base_plus_sba_is_w_and_ab_are_the_chosen_components_of_wc(mode):
    model = BUILDERS["bert"]()
    weight = _query(model).weight.detach().clone()
    before = logits(model)
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["query"], init="corda", corda_mode=mode))
    assert torch.equal(_query(model).base.weight, weight)  # nothing happens before the data
    covariance = _covariance(model, _query(model), _batches())
    shares = dt.eva_init(delta, _batches())
    module = _query(model)
    start = 2.0 * module.lora_B @ module.lora_A  # s B0 A0, s = 8 / 4
    assert torch.allclose(module.base.weight + start, weight, atol=1e-5)  # W_base + s B A == W
    assert torch.allclose(logits(model), before, atol=1e-5)
    # the chosen r components of W C' (C' the damped covariance), mapped back by C'^-1
    damped = covariance + torch.eye(32) * covariance.diagonal().mean() * 0.01
    u, s, vh = torch.linalg.svd(weight @ damped)
    keep = slice(0, 4) if mode == "ipm" else slice(28, 32)
    expected = u[:, keep] @ torch.diag(s[keep]) @ vh[keep] @ torch.linalg.inv(damped)
    assert torch.allclose(start, expected, atol=1e-4)
    assert shares[next(iter(shares))] == pytest.approx(float(s[keep].sum() / s.sum()), rel=1e-4)
    assert torch.equal(module.init_A, module.lora_A) and torch.equal(module.init_B, module.lora_B)


def test_the_factors_reconstruct_w_exactly_when_r_is_full():
    torch.manual_seed(0)
    weight, x = torch.randn(6, 5), torch.randn(40, 5)
    a, b, share = corda_factors(weight, x.T @ x / 40, 5, 1.0, "ipm")
    assert torch.allclose(b @ a, weight, atol=1e-5) and share == pytest.approx(1.0)


def test_unchanged_through_training_steps_then_detach_restores_w_bit_for_bit(arch):
    model = BUILDERS[arch]()
    before = logits(model)
    weights = {n: p.detach().clone() for n, p in named_base_parameters(model)}
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, init="corda"))
    dt.eva_init(delta, [{"input_ids": batch(seed=s)} for s in (1, 2)])
    assert torch.allclose(logits(model), before, atol=1e-4)
    assert any(not torch.equal(p, weights[n]) for n, p in named_base_parameters(model))  # residuals in W
    ids = batch(seed=5)
    opt = torch.optim.AdamW(list(delta.parameters().values()), lr=1e-2)
    losses = []
    for _ in range(5):
        out = model.train()(input_ids=ids, labels=torch.tensor([0, 1, 0]) if arch == "bert" else ids)
        losses.append(out.loss.item())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    delta.merge()
    delta.detach()
    assert all(torch.equal(p, weights[n]) for n, p in named_base_parameters(model))
    assert torch.equal(logits(model.eval()), before)


def test_save_load_onto_a_fresh_base_restores_the_residual_from_the_saved_start(tmp_path):
    model = BUILDERS["gpt2"]()  # Conv1D: the transposed layout
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, init="corda"))
    dt.eva_init(delta, _batches())
    perturb(delta, std=0.05)
    tuned = logits(model)
    delta.save(tmp_path / "ck")
    state = delta.state_dict()
    assert any(k.endswith(".init_A") for k in state) and any(k.endswith(".init_B") for k in state)
    fresh = BUILDERS["gpt2"]()
    loaded = dt.load(fresh, tmp_path / "ck")  # no data: the start comes from the checkpoint
    assert torch.equal(logits(fresh), tuned)
    c_attn = fresh.transformer.h[0].attn.c_attn
    assert torch.equal(c_attn.base.weight, model.transformer.h[0].attn.c_attn.base.weight)  # the same W_res
    loaded.detach()
    assert torch.equal(logits(fresh), logits(BUILDERS["gpt2"]()))


def test_switched_off_is_the_original_model():
    model = BUILDERS["llama"]()
    base = logits(model)
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, init="corda"), name="c")
    dt.eva_init(delta, [{"input_ids": batch()}])
    perturb(delta, std=0.05)
    assert not torch.allclose(logits(model), base, atol=1e-3)
    delta.set_active(False)
    assert torch.allclose(logits(model), base, atol=1e-5)


@pytest.mark.parametrize("arch,targets", [("bert", ["query", "value"]), ("gpt2", ["c_attn", "c_fc"])])
def test_export_is_a_plain_rank_2r_lora_on_the_original_model(tmp_path, arch, targets, monkeypatch):
    # export_matches_peft attaches, perturbs and exports: start the CorDA delta from data in between
    real_attach = dt.attach

    def attach_and_start(model, *configs, **kwargs):
        delta = real_attach(model, *configs, **kwargs)
        dt.eva_init(delta, _batches())
        return delta

    monkeypatch.setattr(dt, "attach", attach_and_start)
    config = export_matches_peft(tmp_path, arch, dt.LoRA(r=4, alpha=8, targets=targets, init="corda"), std=0.05)
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True


def test_same_start_as_peft_corda():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.corda import preprocess_corda

    samples = [batch(seed=s, size=1) for s in (1, 2, 3, 4)]  # PEFT's hook takes one unpadded sample per call
    reference = BUILDERS["bert"]()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="corda",
                          corda_config=peft.tuners.lora.config.CordaConfig(corda_method="ipm"))
    preprocess_corda(reference, cfg, run_model=lambda: [reference(input_ids=ids) for ids in samples])
    pm = peft.get_peft_model(reference, cfg)
    ours = BUILDERS["bert"]()
    delta = dt.attach(ours, dt.LoRA(r=4, alpha=8, targets=["query", "value"], init="corda"), train_modules=None)
    dt.eva_init(delta, [{"input_ids": torch.cat(samples)}])  # one 4-sample batch: the same per-sample statistic
    theirs = pm.base_model.model.bert.encoder.layer[1].attention.self.value
    mine = ours.bert.encoder.layer[1].attention.self.value
    assert torch.allclose(mine.base.weight, theirs.base_layer.weight, atol=1e-5)  # the same residual W
    assert torch.allclose(mine.lora_B @ mine.lora_A,
                          theirs.lora_B["default"].weight @ theirs.lora_A["default"].weight, atol=1e-5)
    assert torch.allclose(outputs(pm), outputs(ours), atol=1e-5)
    perturb(delta, std=0.05)
    with torch.no_grad():
        for name, p in pm.named_parameters():  # the same trained A, B on both sides
            if "lora_" in name:
                path = name.split("base_model.model.")[1].split(".lora_")[0]
                mod = ours.get_submodule(path)
                p.copy_(mod.lora_A if ".lora_A." in name else mod.lora_B)
    assert torch.allclose(outputs(pm), outputs(ours), atol=1e-5)


def test_clear_refusals():
    with pytest.raises(dt.ConfigError, match="corda_mode must be"):
        dt.LoRA(init="corda", corda_mode="both")
    with pytest.raises(dt.ConfigError, match="dora must be False with init='corda'"):
        dt.LoRA(init="corda", dora=True)
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(r=4, targets=["query"], init="corda"))
    with pytest.raises(dt.ConfigError, match="got no batch"):
        dt.eva_init(delta, [])
    dt.eva_init(delta, _batches())
    perturb(delta, std=0.05)
    with pytest.raises(dt.StateError, match="must run before training"):
        dt.eva_init(delta, _batches())


def test_a_second_start_before_training_replaces_the_first():
    model = BUILDERS["bert"]()
    weight = _query(model).weight.detach().clone()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["query"], init="corda"))
    dt.eva_init(delta, _batches())
    dt.eva_init(delta, [{"input_ids": batch(seed=9)}])
    module = _query(model)
    assert torch.allclose(module.base.weight + 2.0 * module.lora_B @ module.lora_A, weight, atol=1e-5)
