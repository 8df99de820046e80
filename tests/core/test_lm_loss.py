"""The fused causal-LM loss (core/lm_loss.py): the model's own loss and gradients, no full logits tensor kept
for backward, rows without a target skipped, and every model it would get wrong refused with the reason."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.core import lm_loss, onednn
from tests.conftest import VOCAB, batch, perturb, tiny_gpt2, tiny_llama


def reference(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets)


def grads_of(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("rows", [1, 7, 40, 64, None])
def test_linear_cross_entropy_equals_the_unfused_loss_and_gradients(rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (40,), generator=g)
    ours = dt.linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=rows)
    ref = reference(hidden, weight, bias, targets)
    assert torch.allclose(ours, ref, atol=1e-6)
    for a, b in zip(grads_of(ours * 3.0, hidden, weight, bias), grads_of(ref * 3.0, hidden, weight, bias),
                    strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_only_the_gradients_asked_for_are_computed():
    hidden = torch.randn(8, 4, requires_grad=True)
    weight, targets = torch.randn(10, 4), torch.randint(0, 10, (8,))
    loss = dt.linear_cross_entropy(hidden, weight, None, targets)
    (grad,) = grads_of(loss, hidden)
    assert torch.allclose(grad, grads_of(reference(hidden, weight, None, targets), hidden)[0], atol=1e-6)
    with torch.no_grad():  # evaluation: the loss only, even for a tensor that requires grad
        loss = dt.linear_cross_entropy(hidden, weight.requires_grad_(), None, targets)
        assert torch.allclose(loss, reference(hidden, weight, None, targets)) and loss.grad_fn is None


def test_no_target_at_all_gives_zero_loss_and_zero_gradient_not_nan():
    hidden = torch.randn(0, 4, requires_grad=True)
    loss = dt.linear_cross_entropy(hidden, torch.randn(10, 4), None, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 4)


def test_bfloat16_inputs_get_bfloat16_gradients_close_to_float32():
    g = torch.Generator().manual_seed(1)
    hidden32, weight = torch.randn(24, 16, generator=g), torch.randn(30, 16, generator=g)
    targets = torch.randint(0, 30, (24,), generator=g)
    hidden = hidden32.bfloat16().requires_grad_()
    loss = dt.linear_cross_entropy(hidden, weight.bfloat16(), None, targets, chunk_rows=5)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    ref = hidden32.clone().requires_grad_()
    reference(ref, weight, None, targets).backward()
    assert abs(loss.item() - reference(hidden32, weight, None, targets).item()) < 0.05
    assert torch.allclose(hidden.grad.float(), ref.grad, atol=2e-3)


def test_bad_shapes_are_named():
    with pytest.raises(dt.DeltaError, match=r"hidden must be \(N, H\) and targets \(N,\); got \(2, 3, 4\)"):
        dt.linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 4), None, torch.zeros(6, dtype=torch.long))


def lm_batch(padded: bool = True) -> dict[str, torch.Tensor]:
    ids = batch(seed=3, size=3, length=12)
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[0, :5] = -100  # a masked prompt
    if padded:
        mask[2, 8:], labels[2, 8:] = 0, -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def model_loss_and_grads(model: nn.Module, loss_of) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training_signal(model: nn.Module, b: dict[str, torch.Tensor], **fused_kwargs) -> None:
    fused = dt.FusedLMLoss(model, **fused_kwargs)
    fused.check(b)
    ref_loss, ref = model_loss_and_grads(model, lambda: model(**b).loss)
    ours_loss, ours = model_loss_and_grads(model, lambda: fused(b))
    assert ours_loss == pytest.approx(ref_loss, rel=1e-6)
    assert ours.keys() == ref.keys() and ref
    for name in ref:
        assert torch.allclose(ours[name], ref[name], rtol=1e-4, atol=1e-7), name


def test_lora_on_llama_gets_the_models_own_loss_and_gradients():
    model = tiny_llama().train()
    perturb(dt.attach(model, dt.LoRA(r=4, targets="all-linear")))
    assert_same_training_signal(model, lm_batch(), chunk_rows=5)


def test_full_training_of_gpt2_with_tied_embeddings():
    model = tiny_gpt2().train()
    for module in model.modules():  # deterministic: compare the two paths on the same function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_same_training_signal(model, lm_batch(padded=False))  # the output layer's (tied) weight trains too


def test_rows_without_a_target_never_reach_the_output_layer():
    b = lm_batch()
    hidden = torch.randn(*b["input_ids"].shape, 8)
    rows, targets = lm_loss.shifted_targets(hidden, b["labels"])
    expected = int((b["labels"][:, 1:] != -100).sum())  # 7 + 11 + 7 targets, of 36 positions
    assert rows.shape == (expected, 8) and targets.shape == (expected,) and expected == 25
    assert torch.equal(rows[0], hidden[0, 4]) and targets[0] == b["labels"][0, 5]


def test_no_tensor_of_logits_is_kept_for_backward():
    model = tiny_llama().train()
    dt.attach(model, dt.LoRA(r=4, targets="all-linear"))
    b = lm_batch(padded=False)
    fused = dt.FusedLMLoss(model)
    positions, targets = b["input_ids"].numel(), int((b["labels"][:, 1:] != -100).sum())

    def saved_logits(loss_of) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            loss_of()
        # a row of logits per position or per target (the (32, VOCAB) output weight is neither)
        return [s for s in shapes if s and s[-1] == VOCAB and math.prod(s[:-1]) in (positions, targets)]

    assert saved_logits(lambda: model(**b).loss)  # the test can see the logits...
    assert not saved_logits(lambda: fused(b))  # ...and the fused loss keeps none


@pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN")
def test_the_output_layer_uses_onednn_when_enabled(monkeypatch):
    model = tiny_llama().train()
    perturb(dt.attach(model, dt.LoRA(r=4, targets="all-linear")))
    b = lm_batch(padded=False)
    ref_loss, ref = model_loss_and_grads(model, lambda: model(**b).loss)
    dt.enable_onednn(model)
    shapes: list[tuple[int, int]] = []
    real = onednn.matmul_t
    monkeypatch.setattr(onednn, "matmul_t", lambda x, w, bias=None: shapes.append(tuple(w.shape)) or real(x, w, bias))
    ours_loss, ours = model_loss_and_grads(model, lambda: dt.FusedLMLoss(model, chunk_rows=16)(b))
    # 29 target rows: a chunk of 16 on oneDNN; the 13 left are under onednn.MIN_TOKENS: the default path
    assert shapes.count((VOCAB, 32)) == 1
    assert ours_loss == pytest.approx(ref_loss, rel=1e-5)
    assert all(torch.allclose(ours[n], ref[n], rtol=1e-4, atol=1e-6) for n in ref)


def test_a_compiled_base_model_gives_the_same_gradients():
    model = tiny_llama().train()
    perturb(dt.attach(model, dt.LoRA(r=4, targets="all-linear")))
    trunk = torch.compile(model.base_model, backend="aot_eager", dynamic=True)
    assert_same_training_signal(model, lm_batch(), trunk=trunk)


def test_a_delta_on_the_output_layer_is_refused():
    model = tiny_llama()
    dt.attach(model, dt.LoRA(r=4, targets=["lm_head"]))
    with pytest.raises(dt.DeltaError, match="output layer is a LoRALinear, not a plain nn.Linear.*lm_head"):
        dt.FusedLMLoss(model)


def test_prompt_tuning_is_refused():
    model = tiny_llama()
    dt.attach(model, dt.PromptTuning(num_tokens=4))
    with pytest.raises(dt.DeltaError, match="hooks run around LlamaForCausalLM.forward"):
        dt.FusedLMLoss(model)


def test_an_encoder_is_refused():
    from tests.conftest import tiny_bert

    with pytest.raises(dt.DeltaError, match="BertForSequenceClassification has no output layer"):
        dt.FusedLMLoss(tiny_bert())


def test_logits_changed_after_the_output_layer_are_caught_by_the_check():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, final_logit_softcapping=0.5))
    fused = dt.FusedLMLoss(model)  # nothing in the structure shows it...
    with pytest.raises(dt.DeltaError, match="changes the logits after its output layer"):
        fused.check(lm_batch())  # ...the comparison with the model's own forward does
    model.config.final_logit_softcapping = None
    fused.check(lm_batch())


def test_the_check_leaves_the_training_mode_and_the_output_layer_as_they_were():
    model = tiny_llama().train()
    dt.FusedLMLoss(model).check(lm_batch())
    assert model.training and not model.lm_head._forward_pre_hooks
