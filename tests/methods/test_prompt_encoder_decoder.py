"""Prompt tuning on encoder-decoder models (T5, BART): the prompt goes in front of the encoder's input, both the
encoder's and the cross-attention's masks cover it, the decoder is unchanged (methods/prompt.py, _EncoderPrompt)."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.arch.models import ARCHS, inputs
from tests.conftest import adam_losses

SEQ2SEQ = ["t5", "bart"]


def _setup(arch):
    model = ARCHS[arch].build()
    delta = dt.attach(model, dt.PromptTuning(num_tokens=3), train_modules=None)
    return model, delta, delta.attachments[0].modules["soft_prompt"].embedding


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_equals_the_base_model_fed_the_prompt_by_hand(arch):
    model, delta, prompt = _setup(arch)
    batch = inputs(arch)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -2:] = 0  # padding: the extended mask must keep it
    with torch.no_grad():
        tuned = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"])
        delta.set_active(False)
        embeds = model.get_input_embeddings()(batch["input_ids"])
        full = torch.cat([prompt.unsqueeze(0).expand(3, -1, -1), embeds], dim=1)
        wide = torch.cat([torch.ones(3, 3, dtype=mask.dtype), mask], dim=1)
        by_hand = model(inputs_embeds=full, attention_mask=wide, labels=batch["labels"])
    assert torch.equal(tuned.logits, by_hand.logits) and tuned.loss == by_hand.loss
    assert tuned.encoder_last_hidden_state.shape[1] == batch["input_ids"].shape[1] + 3  # the decoder reads them


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_generate_reads_the_prompt_cached_and_uncached(arch):
    model, delta, _ = _setup(arch)
    ids = inputs(arch)["input_ids"][:2, :6]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**kwargs, use_cache=True)
        uncached = model.generate(**kwargs, use_cache=False)
        # the scores of every step, by hand through the top-level forward (which runs the encoder itself)
        by_hand = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                        decoder_input_ids=cached.sequences[:, :-1]).logits
        delta.set_active(False)
        base = model.generate(**kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, score in enumerate(cached.scores):
        assert torch.allclose(score, by_hand[:, step], atol=1e-5)
        assert torch.allclose(score, uncached.scores[step], atol=1e-5)
    assert not torch.allclose(cached.scores[0], base.scores[0], atol=1e-4)  # the prompt is read in generate


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_trains_only_the_prompt_and_loads_back(arch, tmp_path):
    model, delta, prompt = _setup(arch)
    losses = adam_losses(model, [prompt], 6, 0.1, **inputs(arch))
    # a frozen random 2-layer decoder leaves a prompt little to move (BART: -8e-4 in 6 steps); it must go down
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert prompt.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if p is not prompt)
    with torch.no_grad():
        tuned = model(**inputs(arch)).logits
    delta.save(tmp_path / "ck")
    fresh = ARCHS[arch].build()
    dt.load(fresh, tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs(arch)).logits, tuned)
    delta.detach()
    with torch.no_grad():
        assert torch.equal(model(**inputs(arch)).logits, ARCHS[arch].build()(**inputs(arch)).logits)


def test_per_sample_routing_is_refused_with_the_reason():
    model, _, _ = _setup("t5")
    with pytest.raises(dt.StateError, match="encoder-decoder"):
        with dt.route(model, ["default", None, "default"]):
            model(**inputs("t5"))
