"""dt.prepare_hotswap / dt.hotswap: another delta's weights in place; same outputs as attaching it fresh, and a
torch.compile'd model does not recompile (compilations counted with torch._dynamo's CompileCounter)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import deltatune as dt
from deltatune.core.errors import BaseModelMismatchError, StateError
from tests.conftest import batch, logits, perturb, tiny_bert, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def saved(tmp_path, name: str, config, seed: int, train_modules=None, build=tiny_llama):
    """A trained-looking delta saved from its own copy of the base; its logits on the base."""
    model = build()
    delta = dt.attach(model, config, train_modules=train_modules)
    perturb(delta, seed=seed, std=0.2)
    delta.save(tmp_path / name)
    return tmp_path / name, logits(model)


@pytest.fixture
def checkpoints(tmp_path):
    return {
        "r8": saved(tmp_path, "r8", dt.LoRA(r=8, alpha=16, targets=TARGETS), seed=1),
        "r2": saved(tmp_path, "r2", dt.LoRA(r=2, alpha=3, targets=TARGETS), seed=2),
        "rslora": saved(tmp_path, "rs", dt.LoRA(r=4, alpha=5, rslora=True, targets=TARGETS,
                                                rank_pattern={"down_proj": 3}), seed=3),
    }


def test_prepare_pads_without_changing_outputs_and_saves_loadably(tmp_path):
    model = tiny_llama()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=TARGETS, alpha_pattern={"v_proj": 2.0}))
    perturb(delta)
    before = logits(model)
    dt.prepare_hotswap(delta, max_rank=8)
    assert {tuple(w.lora_A.shape)[0] for w in delta.wrappers()} == {8}
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=0)
    delta.save(tmp_path / "padded")
    fresh = tiny_llama()
    dt.load(fresh, tmp_path / "padded")
    torch.testing.assert_close(logits(fresh), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["r8", "r2", "rslora"])
def test_swap_gives_the_outputs_of_the_other_delta_attached_fresh(checkpoints, name):
    model = tiny_llama()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=TARGETS))
    perturb(delta)
    dt.prepare_hotswap(delta, max_rank=8)
    params = {k: id(p) for k, p in delta.parameters().items()}
    path, expected = checkpoints[name]
    dt.hotswap(delta, path)
    torch.testing.assert_close(logits(model), expected, atol=1e-6, rtol=0)
    assert {k: id(p) for k, p in delta.parameters().items()} == params  # the same tensors, written in place
    assert not torch.allclose(logits(model), checkpoints["r8" if name != "r8" else "r2"][1], atol=1e-3)


def test_swap_from_a_delta_object_and_back(checkpoints):
    model, other = tiny_llama(), tiny_llama()
    delta = dt.prepare_hotswap(dt.attach(model, dt.LoRA(r=4, targets=TARGETS)), max_rank=8)
    source = dt.load(other, checkpoints["r2"][0])
    dt.hotswap(delta, source)
    torch.testing.assert_close(logits(model), checkpoints["r2"][1], atol=1e-6, rtol=0)
    dt.hotswap(delta, checkpoints["r8"][0])
    torch.testing.assert_close(logits(model), checkpoints["r8"][1], atol=1e-6, rtol=0)


def test_compiled_model_does_not_recompile(checkpoints):
    torch._dynamo.reset()
    model = tiny_llama()
    delta = dt.prepare_hotswap(dt.attach(model, dt.LoRA(r=4, alpha=8, targets=TARGETS)), max_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    ids = batch()
    with torch.no_grad():
        compiled(input_ids=ids)
        compiled(input_ids=ids)
        frames = counter.frame_count
        assert frames > 0
        for name in ("r8", "r2", "rslora", "r8"):
            path, expected = checkpoints[name]
            dt.hotswap(delta, path)
            torch.testing.assert_close(compiled(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    assert counter.frame_count == frames  # alpha / r and rank differ between them: no recompilation
    torch._dynamo.reset()


def test_whole_modules_are_copied_too(tmp_path):
    path, expected = saved(tmp_path, "b", dt.LoRA(r=2, targets=["query"]), seed=4, train_modules=["classifier"],
                           build=tiny_bert)
    model = tiny_bert()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]), train_modules=["classifier"])
    dt.hotswap(delta, path)
    torch.testing.assert_close(logits(model), expected, atol=1e-6, rtol=0)


def unchanged_after(model, error, match, swap) -> None:
    before = logits(model)
    with pytest.raises(error, match=match):
        swap()
    assert torch.equal(logits(model), before)


def test_mismatches_are_refused_with_nothing_copied(tmp_path, checkpoints):
    model = tiny_llama()
    delta = dt.prepare_hotswap(dt.attach(model, dt.LoRA(r=4, targets=TARGETS)), max_rank=4)
    perturb(delta)
    other_targets = saved(tmp_path, "q", dt.LoRA(r=4, targets=["q_proj", "v_proj"]), seed=5)[0]
    unchanged_after(model, StateError, r"other modules.*missing \['model.layers.0.mlp.down_proj'",
                    lambda: dt.hotswap(delta, other_targets))
    unchanged_after(model, StateError, r"max_rank=8", lambda: dt.hotswap(delta, checkpoints["r8"][0]))
    ia3 = saved(tmp_path, "ia3", dt.IA3(targets=["k_proj", "v_proj", "down_proj"]), seed=6)[0]
    unchanged_after(model, StateError, r"\{'ia3': 'ia3'\}.*\{'lora': 'lora'\}", lambda: dt.hotswap(delta, ia3))
    bert = saved(tmp_path, "bert", dt.LoRA(r=2, targets=["query"]), seed=7, build=tiny_bert)[0]
    unchanged_after(model, BaseModelMismatchError, "different parameter shapes", lambda: dt.hotswap(delta, bert))


def test_unswappable_states_are_refused():
    model = tiny_llama()
    dora = dt.attach(model, dt.LoRA(r=4, targets=["q_proj"], dora=True))
    with pytest.raises(StateError, match="DoRA"):
        dt.prepare_hotswap(dora, max_rank=8)
    dora.detach()
    delta = dt.attach(model, dt.LoRA(r=4, targets=["q_proj"]))
    with pytest.raises(StateError, match="max_rank=2"):
        dt.prepare_hotswap(delta, max_rank=2)
    delta.merge()
    with pytest.raises(StateError, match="unmerge"):
        dt.prepare_hotswap(delta, max_rank=8)
