"""Intrinsic prompt tuning: subspace fitting, tuning only z, save/load with the decoder check, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.core.inject import named_base_parameters
from deltatune.methods.ipt import IntrinsicPrompt
from deltatune.methods.prompt import SoftPrompt
from tests.conftest import BUILDERS, batch, logits, perturb, tiny_bert, tiny_llama
from tests.methods.test_prefix import sharpened


def ipt_module(delta) -> IntrinsicPrompt:
    return next(m for m in delta.modules() if isinstance(m, IntrinsicPrompt))


def prompts_in_subspace(k: int, dim: int, shape=(5, 32), seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """k prompts = centre + c_i @ B with a random rank-``dim`` B: they lie exactly in a dim-dimensional subspace."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(shape[0] * shape[1], generator=g)
    basis = torch.randn(dim, centre.numel(), generator=g)
    coords = torch.randn(k, dim, generator=g)
    return [(centre + c @ basis).view(shape) for c in coords], basis


def test_fitting_recovers_prompts_that_lie_in_a_known_subspace(tmp_path):
    prompts, basis = prompts_in_subspace(k=8, dim=3)
    path = dt.fit_intrinsic_subspace(prompts, intrinsic_dim=3, path=tmp_path / "proj.safetensors")
    fitted = load_file(path)
    offset, rows = fitted["offset"], fitted["basis"]
    assert rows.shape == (3, 160) and torch.allclose(rows @ rows.T, torch.eye(3), atol=1e-5)
    for p in prompts:  # encode (project onto the rows) then decode: every prompt comes back
        z = (p.flatten() - offset) @ rows.T
        assert torch.allclose(offset + z @ rows, p.flatten(), atol=1e-4)
    # the fitted rows span the true subspace: projecting the true basis onto them loses nothing
    assert torch.allclose((basis @ rows.T) @ rows, basis, atol=1e-3)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert float(f.metadata()["explained_variance"]) > 0.9999


def test_fewer_dimensions_than_the_data_keep_the_largest_variance(tmp_path):
    prompts, _ = prompts_in_subspace(k=8, dim=4)
    rows = load_file(dt.fit_intrinsic_subspace(prompts, 2, tmp_path / "p.safetensors"))["basis"]
    flat = torch.stack([p.flatten() for p in prompts])
    centred = flat - flat.mean(0)
    kept = (centred @ rows.T).pow(2).sum()
    random_rows = torch.linalg.qr(torch.randn(160, 2, generator=torch.Generator().manual_seed(1))).Q.T
    assert kept > (centred @ random_rows.T).pow(2).sum()  # PCA keeps more variance than a random plane


def test_subspace_from_prompt_checkpoints_reproduces_each_task(tmp_path):
    """Stage 1 from real checkpoints, then stage 2: with z at a task's coordinates, IPT = that task's prompt."""
    dirs, tuned = [], []
    for task in range(4):
        model = tiny_llama()
        delta = dt.attach(model, dt.PromptTuning(num_tokens=3))
        perturb(delta, seed=task, std=0.3)
        tuned.append(logits(model))
        delta.save(tmp_path / f"task{task}")
        dirs.append(tmp_path / f"task{task}")
    path = dt.fit_intrinsic_subspace(dirs, intrinsic_dim=3, path=tmp_path / "proj.safetensors")
    model = tiny_llama()
    delta = dt.attach(model, dt.IntrinsicPromptTuning(num_tokens=3, intrinsic_dim=3, projection=str(path)))
    assert delta.num_trainable() == 3
    module = ipt_module(delta)
    task0 = dt.load(tiny_llama(), dirs[0])
    target = next(m for m in task0.modules() if isinstance(m, SoftPrompt)).embedding.detach()
    with torch.no_grad():
        module.z.copy_((target.flatten() - module.offset) @ module.basis.T)
    assert torch.allclose(logits(model), tuned[0], atol=1e-5)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_only_z_trains_and_the_base_stays_bitwise(arch):
    model = sharpened(arch) if arch != "bert" else tiny_bert()
    delta = dt.attach(model, dt.IntrinsicPromptTuning(num_tokens=4, intrinsic_dim=8), train_modules=None)
    module = ipt_module(delta)
    assert list(delta.parameters().values()) == [module.z] and delta.num_trainable() == 8
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(module.z)}
    offset, basis = module.offset.clone(), module.basis.clone()
    frozen = {n: p.detach().clone() for n, p in named_base_parameters(model)}
    opt = torch.optim.Adam([module.z], lr=0.1)
    ids, losses = batch(), []
    labels = torch.tensor([0, 1, 1]) if arch == "bert" else ids
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if arch != "bert":  # the tiny BERT's frozen head can't be moved by a prompt (see test_prompt)
        assert losses[-1] < 0.995 * losses[0], losses
    assert module.z.abs().sum() > 0
    assert torch.equal(module.offset, offset) and torch.equal(module.basis, basis)
    assert all(torch.equal(p, frozen[n]) and p.grad is None for n, p in named_base_parameters(model))


def test_save_load_rebuilds_the_same_seeded_subspace_and_checks_it(tmp_path):
    model = tiny_llama()
    cfg = dt.IntrinsicPromptTuning(num_tokens=4, intrinsic_dim=8, init="vocab", seed=3)
    delta = dt.attach(model, cfg)
    perturb(delta, std=0.5)
    tuned = logits(model)
    delta.save(tmp_path / "ck")
    assert sorted(k.rsplit(".", 1)[1] for k in delta.state_dict()) == ["decoder_sha256", "z"]  # z only (+ check)
    fresh = tiny_llama()
    dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh), tuned)
    a, b = batch(size=1, length=5), tiny_llama()
    dt.load(b, tmp_path / "ck")
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(b.generate(a, use_cache=True, **kw), b.generate(a, use_cache=False, **kw))


def test_loading_z_into_another_subspace_fails_loudly(tmp_path):
    prompts, _ = prompts_in_subspace(k=5, dim=2, shape=(4, 32))
    one = dt.fit_intrinsic_subspace(prompts, 2, tmp_path / "one.safetensors")
    delta = dt.attach(tiny_llama(), dt.IntrinsicPromptTuning(num_tokens=4, intrinsic_dim=2, projection=str(one)))
    delta.save(tmp_path / "ck")
    other, _ = prompts_in_subspace(k=5, dim=2, shape=(4, 32), seed=9)
    dt.fit_intrinsic_subspace(other, 2, one)  # the file changes under the checkpoint
    fresh = tiny_llama()
    names = dict(fresh.named_modules())
    with pytest.raises(dt.CheckpointError, match="another subspace"):
        dt.load(fresh, tmp_path / "ck")
    assert dict(fresh.named_modules()) == names and not fresh._forward_pre_hooks


def test_detach_restores_the_model():
    model = tiny_bert()
    modules, before = dict(model.named_modules()), logits(model)
    delta = dt.attach(model, dt.IntrinsicPromptTuning(num_tokens=4, intrinsic_dim=8))
    assert "intrinsic_prompt" in dt.inspect(model) and "z in R^8" in dt.inspect(model)
    delta.detach()
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(logits(model), before)


def test_projection_of_the_wrong_shape_names_the_field_and_both_shapes(tmp_path):
    prompts, _ = prompts_in_subspace(k=5, dim=2, shape=(4, 32))
    path = dt.fit_intrinsic_subspace(prompts, 2, tmp_path / "p.safetensors")
    model = tiny_llama()
    names = dict(model.named_modules())
    with pytest.raises(dt.ConfigError, match=r"ipt.projection.*\[2, 128\].*\[3, 128\]"):
        dt.attach(model, dt.IntrinsicPromptTuning(num_tokens=4, intrinsic_dim=3, projection=str(path)))
    with pytest.raises(dt.ConfigError, match=r"ipt.projection.*\[2, 128\].*\[2, 160\]"):
        dt.attach(model, dt.IntrinsicPromptTuning(num_tokens=5, intrinsic_dim=2, projection=str(path)))
    save_file({"basis": torch.zeros(2, 128)}, tmp_path / "bad.safetensors")
    bad = dt.IntrinsicPromptTuning(num_tokens=4, intrinsic_dim=2, projection=str(tmp_path / "bad.safetensors"))
    with pytest.raises(dt.ConfigError, match="offset"):
        dt.attach(model, bad)
    with pytest.raises(dt.CheckpointNotFoundError, match="ipt.projection"):
        dt.attach(model, dt.IntrinsicPromptTuning(num_tokens=4, intrinsic_dim=2, projection=str(tmp_path / "none")))
    assert dict(model.named_modules()) == names and not model._forward_pre_hooks


def test_fit_errors_are_clear(tmp_path):
    prompts, _ = prompts_in_subspace(k=3, dim=2)
    with pytest.raises(dt.ConfigError, match="intrinsic_dim"):
        dt.fit_intrinsic_subspace(prompts, 3, tmp_path / "p")  # 3 prompts span at most 2 directions
    with pytest.raises(dt.ConfigError, match="at least 2"):
        dt.fit_intrinsic_subspace(prompts[:1], 1, tmp_path / "p")
    with pytest.raises(dt.ConfigError, match="shape"):
        dt.fit_intrinsic_subspace([prompts[0], torch.zeros(4, 32)], 1, tmp_path / "p")
    lora = dt.attach(tiny_llama(), dt.LoRA(r=2))
    lora.save(tmp_path / "lora")
    with pytest.raises(dt.CheckpointError, match="exactly one prompt"):
        dt.fit_intrinsic_subspace([tmp_path / "lora", prompts[0]], 1, tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("field, value", [("num_tokens", 0), ("intrinsic_dim", 0), ("intrinsic_dim", 2.5),
                                          ("init", "nope"), ("projection", 5)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(dt.ConfigError, match=field):
        dt.IntrinsicPromptTuning(**{field: value})


def test_random_subspace_larger_than_the_prompt_is_refused():
    with pytest.raises(dt.ConfigError, match="intrinsic_dim"):
        dt.attach(tiny_llama(), dt.IntrinsicPromptTuning(num_tokens=2, intrinsic_dim=65))
