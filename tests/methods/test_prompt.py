"""Prompt tuning on tiny BERT, Llama (GQA) and GPT-2.

Reference: a prompt-tuned model must give exactly what the base model gives on
``inputs_embeds = [prompt; embed(input_ids)]`` (with the virtual positions cut off the outputs), for the
logits and for the loss. Then: masks/padding, explicit positions and token types, cached == uncached
generation, inits, save/load, detach, and errors.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.inject import named_base_parameters
from deltatune.methods.prompt import SoftPrompt
from tests.conftest import BUILDERS, adam_losses, batch, logits, perturb, tiny_bert, tiny_llama
from tests.methods.test_prefix import left_padded, positions, right_padded, sharpened

DECODERS = ["gpt2", "llama"]


def states(model, ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Last hidden states of the real tokens, through the top-level model (where the prompt hooks sit)."""
    with torch.no_grad():
        return model(input_ids=batch() if ids is None else ids, output_hidden_states=True, **kwargs).hidden_states[-1]


def prompt_of(delta) -> torch.Tensor:
    return next(m for m in delta.modules() if isinstance(m, SoftPrompt)).embedding


def reference(base, prompt: torch.Tensor, ids: torch.Tensor, at: int = 0, **kwargs):
    """What the base model gives with the prompt put into the embedded ids by hand, before index ``at``."""
    embeds = base.get_input_embeddings()(ids)
    embeds = torch.cat([embeds[:, :at], prompt.detach().expand(len(ids), -1, -1), embeds[:, at:]], dim=1)
    with torch.no_grad():
        return base(inputs_embeds=embeds, **kwargs)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_outputs_equal_the_base_model_on_prompt_plus_embeddings(arch):
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.PromptTuning(num_tokens=4), train_modules=None)  # BERT: no head copy
    assert delta.num_trainable() == 4 * 32
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in delta.parameters().values()}
    ids = batch()
    at = 1 if arch == "bert" else 0  # an encoder keeps its first ([CLS]) token first, for its pooler
    want = reference(BUILDERS[arch](), prompt_of(delta), ids, at).logits
    got = logits(model, ids)
    if arch == "bert":
        assert torch.allclose(got, want, atol=1e-6)  # sequence logits: nothing to cut
        assert not torch.allclose(got, reference(BUILDERS[arch](), prompt_of(delta), ids, 0).logits, atol=1e-5)
        labels = torch.tensor([0, 1, 1])  # sequence labels are left as they are
        loss = model(input_ids=ids, labels=labels).loss
        assert torch.allclose(loss, reference(BUILDERS[arch](), prompt_of(delta), ids, at, labels=labels).loss)
        loss.backward()
        assert prompt_of(delta).grad.abs().sum() > 0
        return
    assert got.shape == (3, 11, 100)  # aligned with input_ids, like the base model
    assert torch.allclose(got, want[:, 4:], atol=1e-6)
    labels = torch.cat([torch.full((3, 4), -100), ids], dim=1)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.allclose(loss, reference(BUILDERS[arch](), prompt_of(delta), ids, labels=labels).loss)


def test_hidden_states_are_cut_to_the_real_tokens_and_positional_inputs_work():
    model = tiny_llama()
    dt.attach(model, dt.PromptTuning(num_tokens=4))
    ids = batch()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)  # positional input_ids
    assert out.logits.shape[1] == 11 and all(h.shape[1] == 11 for h in out.hidden_states)
    assert torch.equal(out.logits, logits(model, ids))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_explicit_positions_and_token_types_are_shifted_like_the_defaults(arch):
    model = BUILDERS[arch]()
    perturb(dt.attach(model, dt.PromptTuning(num_tokens=4)), std=0.5)
    ids = batch()
    plain = states(model, ids)
    explicit = {"position_ids": torch.arange(11).expand(3, -1)}
    if arch == "bert":
        explicit["token_type_ids"] = torch.zeros_like(ids)
    assert torch.allclose(plain, states(model, ids, **explicit), atol=1e-6)
    assert plain.shape == (3, 11, 32)
    shifted = states(model, ids, position_ids=torch.arange(1, 12).expand(3, -1))  # positions really are read
    assert not torch.allclose(plain, shifted, atol=1e-4)


def test_token_level_labels_get_minus_100_at_the_virtual_positions():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64)).eval()
    delta = dt.attach(model, dt.PromptTuning(num_tokens=3), train_modules=None)
    ids, labels = batch(), batch(seed=9) % 2
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (3, 11, 2)  # the virtual positions are cut out of the logits...
    # ...and were labelled -100 inside, so the model's loss is the loss over the real tokens alone
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten()))
    assert delta.num_trainable() == 3 * 32


def test_encoder_right_padding_gives_each_sequence_its_unpadded_output():
    model = tiny_bert()
    perturb(dt.attach(model, dt.PromptTuning(num_tokens=3)), std=0.5)
    ids, mask, (a, b) = right_padded([9, 5], 9)
    padded = states(model, ids, attention_mask=mask)
    assert torch.allclose(padded[0], states(model, a[None])[0], atol=1e-5)
    assert torch.allclose(padded[1, :5], states(model, b[None])[0], atol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_left_padding_gives_each_sequence_its_unpadded_output(arch):
    model = BUILDERS[arch]()
    perturb(dt.attach(model, dt.PromptTuning(num_tokens=3)), std=0.5)
    ids, mask, seqs = left_padded([8, 5, 2], 8)
    padded = logits(model, ids, attention_mask=mask, position_ids=positions(mask))
    for i, s in enumerate(seqs):
        assert torch.allclose(padded[i, 8 - len(s):], logits(model, s[None])[0], atol=1e-5), i


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_with_cache_equals_without_token_by_token(arch):
    model = BUILDERS[arch]()
    perturb(dt.attach(model, dt.PromptTuning(num_tokens=4)), std=0.5)
    ids, mask, _ = left_padded([6, 3], 6)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kw))
    assert cached.shape == (2, 14)  # the virtual tokens never show up in the output ids
    assert not torch.equal(cached, BUILDERS[arch]().generate(ids, use_cache=True, **kw))


@pytest.mark.parametrize("arch", DECODERS)
def test_training_moves_only_the_prompt_and_reduces_the_loss(arch):
    model = sharpened(arch)
    delta = dt.attach(model, dt.PromptTuning(num_tokens=4))
    frozen = {n: p.detach().clone() for n, p in named_base_parameters(model)}
    ids = batch()
    losses = adam_losses(model, delta.parameters().values(), 12, 3e-2, input_ids=ids, labels=ids)
    assert losses[-1] < 0.97 * losses[0], losses  # measured 0.96 (GPT-2), 0.90 (Llama)
    # GPT-2 ties its output and input embeddings: the prompt reads them, they still get no gradient
    assert all(torch.equal(p, frozen[n]) and p.grad is None for n, p in named_base_parameters(model))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_save_load_detach_and_deactivate(arch, tmp_path):
    model = BUILDERS[arch]()
    before, hidden = logits(model), states(model)  # output_hidden_states installs transformers' own hooks
    modules = dict(model.named_modules())
    hooks = {n: (list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in model.named_modules()}
    delta = dt.attach(model, dt.PromptTuning(num_tokens=3))
    perturb(delta, std=0.3)
    tuned = logits(model)
    assert not torch.allclose(states(model), hidden, atol=1e-3)
    delta.save(tmp_path / "ck")
    fresh = BUILDERS[arch]()
    dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh), tuned)
    delta.set_active(False)
    assert torch.equal(logits(model), before)
    delta.set_active(True)
    delta.detach()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert dict(model.named_modules()).keys() == modules.keys()
    assert {n: (list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in model.named_modules()} == hooks
    assert torch.equal(logits(model), before) and torch.equal(states(model), hidden)


def test_vocab_init_takes_rows_of_the_embedding_matrix():
    model = tiny_llama()
    prompt = prompt_of(dt.attach(model, dt.PromptTuning(num_tokens=6, init="vocab")))
    table = model.get_input_embeddings().weight
    assert all((table == row).all(dim=1).any() for row in prompt)


def test_random_init_has_the_scale_of_the_embeddings():
    model = tiny_llama()
    prompt = prompt_of(dt.attach(model, dt.PromptTuning(num_tokens=50)))
    ratio = prompt.std() / model.get_input_embeddings().weight.std()
    assert 0.8 < ratio < 1.2


@pytest.fixture
def word_tokenizer(tmp_path):
    """A tiny word-level tokenizer whose ids fit the tiny models' vocabulary of 100."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 3, "classify": 10, "the": 11, "sentiment": 12}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def test_text_init_repeats_the_text_tokens(word_tokenizer):
    model = tiny_llama()
    cfg = dt.PromptTuning(num_tokens=5, init="text:classify the sentiment", tokenizer=word_tokenizer)
    prompt = prompt_of(dt.attach(model, cfg))
    table = model.get_input_embeddings().weight
    assert torch.equal(prompt, table[[10, 11, 12, 10, 11]])


def test_text_init_without_a_tokenizer_is_a_clear_error_and_touches_nothing():
    model = tiny_llama()
    names = dict(model.named_modules())
    with pytest.raises(dt.ConfigError, match="tokenizer"):
        dt.attach(model, dt.PromptTuning(num_tokens=5, init="text:hello"))
    assert dict(model.named_modules()) == names and not model._forward_pre_hooks


@pytest.mark.parametrize("field, value", [("num_tokens", 0), ("num_tokens", -1), ("init", "zeros"),
                                          ("init", "text:"), ("tokenizer", 3)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(dt.ConfigError, match=field):
        dt.PromptTuning(**{field: value})


def test_encoder_decoder_prompt_detaches_without_a_trace():
    """Encoder-decoder models get the prompt on the encoder side (test_prompt_encoder_decoder.py); detach takes
    both hooks (encoder and top-level model) and the prompt module out again."""
    from tests.methods.test_prefix import tiny_seq2seq

    model = tiny_seq2seq("bart")
    names = dict(model.named_modules())
    dt.attach(model, dt.PromptTuning(num_tokens=3))
    assert model._forward_pre_hooks and model.get_encoder()._forward_pre_hooks
    dt.detach(model)
    assert dict(model.named_modules()) == names
    assert not model._forward_pre_hooks and not model.get_encoder()._forward_pre_hooks


@pytest.mark.parametrize("cache_key", ["cache", "past_key_values"])  # transformers 5.24 renamed it "cache"
def test_cache_position_is_shifted_past_the_prompt(cache_key):
    """transformers 5 no longer passes cache_position, remote-code models still may: it must count the prompt.
    A step with a filled cache (under either name) gets no second prompt."""
    model = tiny_llama()
    delta = dt.attach(model, dt.PromptTuning(num_tokens=4))
    hooks = next(h for h in model._forward_pre_hooks.values()).__self__
    _, first = hooks.before(model, (), {"input_ids": batch(), "cache_position": torch.arange(11)})
    assert torch.equal(first["cache_position"], torch.arange(15))
    hooks.stack.clear()
    with torch.no_grad():
        cache = model(input_ids=batch(), use_cache=True).past_key_values  # holds 4 + 11 positions
    _, step = hooks.before(model, (), {"input_ids": batch()[:, :1], cache_key: cache,
                                       "cache_position": torch.tensor([11]), "attention_mask": torch.ones(3, 12)})
    assert torch.equal(step["cache_position"], torch.tensor([15])) and step["attention_mask"].shape == (3, 16)
    assert step["input_ids"].shape == (3, 1) and step.get("inputs_embeds") is None
    assert delta.num_trainable() == 4 * 32


def test_prompts_cannot_be_merged_into_weights():
    delta = dt.attach(tiny_llama(), dt.PromptTuning(num_tokens=3))
    with pytest.raises(dt.StateError, match="prompt"):
        delta.merge()


def test_a_prepared_4d_mask_is_refused_clearly():
    model = tiny_llama()
    dt.attach(model, dt.PromptTuning(num_tokens=3))
    with pytest.raises(dt.StateError, match="2D attention_mask"):
        model(input_ids=batch(), attention_mask=torch.ones(3, 1, 11, 11))
    logits(model)  # the failed call left nothing behind
