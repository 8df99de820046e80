"""Prefix tuning on tiny BERT, Llama (GQA: 4 heads, 2 KV heads) and GPT-2.

The central check is an independent reference: a prefix whose keys/values are the cached keys/values of
a real context must give exactly what the base model gives on context + input. The rest: padding in both
directions, cached == uncached generation, eager == sdpa, reparameterisation folding, save/load, detach,
several named prefix deltas, and the errors.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.inject import named_base_parameters
from deltatune.methods.prefix import PrefixEncoder, PrefixKV, fold_prefixes
from tests.conftest import BUILDERS, adam_losses, batch, logits, perturb, tiny_bert, tiny_gpt2, tiny_llama

DECODERS = ["gpt2", "llama"]


def prefixes(delta) -> list[PrefixKV]:
    """The delta's per-layer prefix modules, in layer order."""
    return [m for a in delta.attachments for m in a.modules.values() if isinstance(m, PrefixKV)]


def padded(lengths: list[int], total: int, seed: int, left: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Padded ids and mask for sequences of ``lengths`` (pad id 0, sequence i from seed + i), plus the
    unpadded sequences."""
    seqs = [batch(seed=seed + i, size=1, length=n)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(seqs), total, dtype=torch.long)
    mask = torch.zeros(len(seqs), total, dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(total - len(s), total) if left else slice(0, len(s))
        ids[i, where], mask[i, where] = s, 1
    return ids, mask, seqs


def left_padded(lengths: list[int], total: int, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor, list]:
    return padded(lengths, total, seed, left=True)


def right_padded(lengths: list[int], total: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, list]:
    return padded(lengths, total, seed, left=False)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def sharpened(arch: str):
    """The tiny models' heads are 0.02-scale weights after a norm, which caps how far any frozen-head method
    moves the loss (about 1% for prefixes); scaling the head by 10 lets a few steps show real learning."""
    model = BUILDERS[arch]()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
    return model


def states(model, ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Final hidden states of every token: a sharper signal than the tiny BERT head's near-zero logits."""
    with torch.no_grad():
        return model.base_model(input_ids=batch() if ids is None else ids, **kwargs).last_hidden_state


# -- structure ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_every_attention_layer_gets_kv_prefixes_of_the_kv_head_layout(arch):
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=0), train_modules=None)  # no head
    kv_heads = 2 if arch == "llama" else 4  # tiny Llama: grouped-query attention, 4 query heads share 2 KV heads
    layers = prefixes(delta)
    assert len(layers) == 2
    assert all(m.key.shape == m.value.shape == (kv_heads, 3, 8) for m in layers)
    assert delta.num_trainable() == 2 * 2 * kv_heads * 3 * 8
    assert model.config._attn_implementation == "deltatune_prefix_sdpa"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in delta.parameters().values()}
    text = dt.inspect(model)
    assert text.count("prefix: prefix adds") == 2 and f"{2 * kv_heads * 3 * 8:,} params" in text


def test_reparameterisation_counts_p_prime_and_one_shared_mlp():
    model = tiny_llama()
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=16))
    width, out = 2 * 8, 2 * (2 * 2 * 8)  # P' rows are one key wide; the MLP emits k and v of both layers
    assert delta.num_trainable() == 3 * width + (width * 16 + 16) + (16 * out + out)
    assert all(not list(m.parameters()) for m in prefixes(delta))  # the layers read from the MLP


# -- the reference: a prefix is a virtual context -----------------------------------------------------

@pytest.mark.parametrize("arch", DECODERS)
def test_prefix_of_context_keys_equals_running_on_context_plus_input(arch):
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=4, reparam_hidden=0))
    context, x = batch(seed=3, size=1, length=4), batch(seed=5, size=1, length=7)
    delta.set_active(False)
    with torch.no_grad():
        cache = model(input_ids=context, use_cache=True).past_key_values
        want = model(input_ids=torch.cat([context, x], dim=1)).logits[:, 4:]
        for layer, prefix in zip(cache.layers, prefixes(delta)):
            prefix.key.copy_(layer.keys[0])  # (kv_heads, 4, head_dim); Llama's keys come already rotated
            prefix.value.copy_(layer.values[0])
    delta.set_active(True)
    got = logits(model, x, position_ids=torch.arange(4, 11).unsqueeze(0))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


# -- masks, padding, implementations ----------------------------------------------------------------

def test_encoder_right_padding_gives_each_sequence_its_unpadded_output():
    model = tiny_bert()
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=0))
    perturb(delta, std=0.5)
    ids, mask, (a, b) = right_padded([9, 5], 9)
    padded = states(model, ids, attention_mask=mask)
    assert torch.allclose(padded[0], states(model, a[None])[0], atol=1e-5)
    assert torch.allclose(padded[1, :5], states(model, b[None])[0], atol=1e-5)
    assert torch.allclose(logits(model, ids, attention_mask=mask)[1], logits(model, b[None])[0], atol=1e-6)
    assert not torch.allclose(padded, states(tiny_bert(), ids, attention_mask=mask), atol=1e-2)


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_left_padding_gives_each_sequence_its_unpadded_output(arch):
    model = BUILDERS[arch]()
    perturb(dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=0)), std=0.5)
    ids, mask, seqs = left_padded([8, 5, 2], 8)
    padded = logits(model, ids, attention_mask=mask, position_ids=positions(mask))
    for i, s in enumerate(seqs):
        alone = logits(model, s[None])[0]
        assert torch.allclose(padded[i, 8 - len(s):], alone, atol=1e-5), i


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_eager_and_sdpa_agree_with_and_without_padding(arch):
    outs = []
    for implementation in ("sdpa", "eager"):
        model = BUILDERS[arch]()
        model.set_attn_implementation(implementation)
        delta = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=0))
        assert model.config._attn_implementation == f"deltatune_prefix_{implementation}"
        perturb(delta, std=0.5)
        ids, mask, _ = left_padded([7, 4], 7)
        # no mask: sdpa would use is_causal (a None mask), which the prefix path must turn into a real one
        outs.append((logits(model, ids), logits(model, ids, attention_mask=mask)))
    for sdpa, eager in zip(*outs):
        assert torch.allclose(sdpa, eager, atol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_with_cache_equals_without_token_by_token(arch):
    model = BUILDERS[arch]()
    perturb(dt.attach(model, dt.PrefixTuning(num_tokens=4, reparam_hidden=0)), std=0.5)
    ids, mask, _ = left_padded([6, 3], 6)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    base = BUILDERS[arch]().generate(ids, use_cache=True, **kw)
    assert not torch.equal(cached, base)  # the prefix steers generation


def tiny_seq2seq(kind: str, implementation: str = "sdpa"):
    """BART (absolute positions) or T5 (relative position bias, which the prefix slots must get none of)."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "t5":
        cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4, decoder_start_token_id=0)
        model = T5ForConditionalGeneration(cfg)
    else:
        cfg = BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
        model = BartForConditionalGeneration(cfg)
    model.set_attn_implementation(implementation)
    return model.eval()


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_encoder_decoder_self_and_cross_attention_get_prefixes(kind):
    ids, mask, _ = left_padded([7, 4], 7)
    outs = []
    for implementation in ("sdpa", "eager"):
        model = tiny_seq2seq(kind, implementation)
        delta = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=0))
        assert len(prefixes(delta)) == 6  # encoder self, decoder self, decoder cross; 2 layers each
        perturb(delta, std=0.5)
        outs.append(logits(model, ids, attention_mask=mask, decoder_input_ids=ids[:, :4]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


# -- training, folding, saving ---------------------------------------------------------------------

@pytest.mark.parametrize("reparam", [0, 32])
@pytest.mark.parametrize("arch", DECODERS)
def test_training_moves_only_the_prefix_and_reduces_the_loss(arch, reparam):
    model = sharpened(arch)
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=4, reparam_hidden=reparam))
    frozen = {n: p.detach().clone() for n, p in named_base_parameters(model)}
    ids = batch()
    losses = adam_losses(model, delta.parameters().values(), 12, 3e-2, input_ids=ids, labels=ids)
    # measured: plain 0.98 (GPT-2) / 0.86 (Llama) of the first loss, with the MLP 0.70 / 0.72
    assert losses[-1] < (0.8 if reparam else 0.99) * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert all(torch.equal(p, frozen[n]) and p.grad is None for n, p in named_base_parameters(model))


def test_bert_classifier_trains_much_further_with_the_prefix_than_with_its_head_alone():
    final = {}
    for active in (True, False):
        model = tiny_bert()
        delta = dt.attach(model, dt.PrefixTuning(num_tokens=4), train_modules=["classifier"])
        for module in prefixes(delta):
            module.active = active  # off: the very same run with only the classifier head doing anything
        opt = torch.optim.Adam(delta.parameters().values(), lr=3e-2)
        for _ in range(10):
            opt.zero_grad()
            loss = model(input_ids=batch(), labels=torch.tensor([0, 1, 1])).loss
            loss.backward()
            opt.step()
        final[active] = loss.item()
        assert all(p.grad is None for n, p in named_base_parameters(model) if not n.startswith("classifier"))
    assert final[True] < 0.7 * final[False], final  # measured 0.25 vs 0.54


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_folding_the_mlp_keeps_outputs_and_leaves_plain_prefixes(arch):
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=16), train_modules=None)
    perturb(delta, std=0.3)
    before = logits(model)
    assert fold_prefixes(delta) == 2
    assert torch.allclose(logits(model), before, atol=1e-6)
    assert all(m.encoder is None and m.key.requires_grad for m in prefixes(delta))
    encoder = next(m for a in delta.attachments for m in a.modules.values() if isinstance(m, PrefixEncoder))
    assert not list(encoder.parameters())
    assert delta.num_trainable() == 2 * 2 * (2 if arch == "llama" else 4) * 3 * 8
    assert fold_prefixes(delta) == 0


@pytest.mark.parametrize("reparam", [0, 16])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_save_then_load_onto_a_fresh_base_gives_identical_outputs(arch, reparam, tmp_path):
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=reparam))
    perturb(delta, std=0.3)
    tuned = logits(model)
    delta.save(tmp_path / "ck")
    saved = [k for k in delta.state_dict() if k.startswith("prefix:")]
    assert saved and all(k.endswith((".key", ".value")) for k in saved)  # folded: plain prefixes only
    fresh = BUILDERS[arch]()
    loaded = dt.load(fresh, tmp_path / "ck")
    assert torch.allclose(logits(fresh), tuned, atol=1e-6)
    assert all(m.encoder is None for m in prefixes(loaded))  # a loaded delta is plain prefixes
    assert loaded.num_trainable() == sum(t.numel() for t in delta.state_dict().values())


def test_loading_into_a_live_reparameterised_delta_makes_it_plain_with_the_same_outputs():
    model = tiny_llama()
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=8))
    perturb(delta)
    before, old = logits(model), list(delta.parameters().values())  # kept alive: ids are not reused
    delta.load_state_dict(delta.state_dict())  # e.g. restoring the best checkpoint at the end of training
    assert torch.allclose(logits(model), before, atol=1e-6)
    assert not {id(p) for p in old} & {id(p) for p in delta.parameters().values()}  # rebuild any optimizer
    assert delta.num_trainable() == 2 * 2 * 2 * 3 * 8


def test_prefixes_follow_to_and_a_loaded_checkpoint_takes_the_models_dtype(tmp_path):
    model = tiny_llama()
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=8))
    perturb(delta)
    model.to(torch.float64)  # the MLP and the layers' anchors move with the model
    assert all(p.dtype == torch.float64 for p in delta.parameters().values())
    tuned = logits(model)
    assert tuned.dtype == torch.float64
    delta.save(tmp_path / "ck")  # written as float64; loaded onto a float32 base it must become float32
    fresh = tiny_llama()
    loaded = dt.load(fresh, tmp_path / "ck")
    assert all(m.key.dtype == torch.float32 for m in prefixes(loaded))
    assert torch.allclose(logits(fresh), tuned.float(), atol=1e-5)


# -- detach, switching, several deltas ------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_detach_restores_modules_attention_implementation_and_outputs(arch):
    model = BUILDERS[arch]()
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before, hidden = logits(model), states(model)
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=8))
    perturb(delta)
    assert not torch.allclose(states(model), hidden, atol=1e-3)
    delta.detach()
    assert model.config._attn_implementation == "sdpa"
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert torch.equal(logits(model), before) and torch.equal(states(model), hidden)


def test_an_inactive_prefix_has_no_effect():
    model = tiny_llama()
    before = logits(model)
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3))
    perturb(delta)
    delta.set_active(False)
    assert torch.equal(logits(model), before)
    delta.set_active(True)
    assert not torch.allclose(logits(model), before, atol=1e-4)


def test_two_named_prefix_deltas_switch_save_and_detach_independently(tmp_path):
    model = tiny_llama()
    base = logits(model)
    a = dt.attach(model, dt.PrefixTuning(num_tokens=3, reparam_hidden=0), name="a")
    perturb(a, seed=1)
    b = dt.attach(model, dt.PrefixTuning(num_tokens=2, reparam_hidden=0), name="b")  # deactivates a
    perturb(b, seed=2)
    out_b = logits(model)
    assert any(path.endswith("prefix_2") for path in b.attachments[0].modules)  # a holds "prefix"
    b.save(tmp_path / "b")
    fresh = tiny_llama()
    dt.load(fresh, tmp_path / "b")  # same keys although b sat at ".prefix_2"
    assert torch.equal(logits(fresh), out_b)
    b.set_active(False)
    a.set_active(True)
    out_a = logits(model)
    a.detach()  # b still needs the prefixing attention: the route stays
    assert model.config._attn_implementation == "deltatune_prefix_sdpa"
    b.set_active(True)
    assert torch.equal(logits(model), out_b) and not torch.allclose(out_a, out_b)
    b.detach()
    assert model.config._attn_implementation == "sdpa" and torch.equal(logits(model), base)


def test_prefixes_cannot_be_merged_into_weights():
    model = tiny_llama()
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3))
    with pytest.raises(dt.StateError, match="prefix"):
        delta.merge()


def test_switching_the_attention_implementation_afterwards_fails_loudly():
    model = tiny_llama()
    dt.attach(model, dt.PrefixTuning(num_tokens=3))
    model.config._attn_implementation = "sdpa"
    with pytest.raises(dt.StateError, match="attn_implementation"):
        logits(model)


# -- errors: clear, and the model untouched ------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -2, 1.5, None])
def test_num_tokens_must_be_positive(bad):
    with pytest.raises(dt.ConfigError, match="num_tokens"):
        dt.PrefixTuning(num_tokens=bad)


def test_reparam_hidden_must_be_non_negative():
    with pytest.raises(dt.ConfigError, match="reparam_hidden"):
        dt.PrefixTuning(reparam_hidden=-1)


def snapshot(model):
    return (dict(model.named_modules()), model.config._attn_implementation,
            {n: p.requires_grad for n, p in model.named_parameters()})


def test_model_without_attention_interface_is_refused_untouched():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    names = dict(model.named_modules())
    with pytest.raises(dt.AttachError, match="no attention module"):
        dt.attach(model, dt.PrefixTuning(num_tokens=3))
    assert dict(model.named_modules()) == names


def test_attention_without_a_dense_mask_is_refused_untouched():
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"  # as if loaded with it (no kernel needed here)
    before = snapshot(model)
    with pytest.raises(dt.AttachError, match="flash_attention_2.*sdpa"):
        dt.attach(model, dt.PrefixTuning(num_tokens=3))
    assert snapshot(model) == before


def test_failure_of_a_later_method_rolls_the_prefix_back():
    model = tiny_gpt2()
    before, out = snapshot(model), logits(model)
    with pytest.raises(dt.TargetError):
        dt.attach(model, dt.PrefixTuning(num_tokens=3), dt.LoRA(targets=["no_such_module"]))
    assert snapshot(model) == before
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert torch.equal(logits(model), out)
