"""Prompt tuning: trainable "soft prompt" vectors added to the input embeddings
(Lester, Al-Rfou & Constant, 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691).

Two hooks on the top-level model, their handles in the attachment record (no wrapper, no patched class):
- a forward pre-hook turns ``input_ids`` into ``inputs_embeds`` and inserts the prompt: first in a model that
  generates (as in the paper), right after the first token in other models (encoders), so their pooler /
  classification head keeps reading [CLS] / <s>. It inserts matching ones in the attention mask, zeros in
  token_type_ids and -100 in token-level labels, numbers the virtual tokens on from the token before them
  and shifts explicit ``position_ids`` / ``cache_position`` of the later tokens by P;
- a forward hook cuts the P virtual positions out of ``logits``, ``last_hidden_state`` and ``hidden_states``,
  so outputs line up with ``input_ids`` as in the base model (``attentions`` keep them). The loss is computed
  inside the model on the extended labels, so it is the same either way.
During cached generation the cache already holds the prompt after the first step: later steps only get their
mask extended and positions shifted.

Encoder-decoder models (T5, BART) get the prompt on the encoder side, in front of the input (``_EncoderPrompt``):
a pre-hook on the encoder inserts it (and extends the encoder's mask), and a pre-hook on the top-level model
extends the attention mask it hands the decoder's cross-attention, so it covers the prompt too. The decoder is
unchanged; ``encoder_last_hidden_state`` keeps the prompt positions (the decoder reads them). Hooking the encoder
itself matters: ``generate`` runs it on its own, past the top-level forward.

``install_prompt`` is shared with intrinsic prompt tuning (ipt.py), whose prompt is a function of z.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Protocol

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.errors import AttachError, ConfigError, StateError
from ..core.inject import Attachment, DeltaModule, add_free_module
from ..core.recipe import Recipe
from ..core.registry import register

INITS = "'random', 'vocab' or 'text:<words>'"
PROMPTS = "_deltatune_prompts"  # model.__dict__ key: the prompt modules attached to the model


@dataclasses.dataclass
class PromptTuning(DeltaConfig):
    method = "prompt"
    recipe = Recipe(learning_rate=3e-3, head_learning_rate=1e-2)  # measured: BENCHMARKS.md "Defaults"

    num_tokens: int = 20        # prompt length: capacity grows with it, and so does every sequence
    init: str = "random"        # "random" (scaled to the embeddings), "vocab" (random token rows), "text:<words>"
    tokenizer: str | None = None  # name/path for init="text:..."; None: the model's own name_or_path

    def validate(self) -> None:
        check_prompt_fields(self)


def check_prompt_fields(cfg: DeltaConfig) -> None:
    """Validation shared by every prompt method (num_tokens, init, tokenizer)."""
    cfg._require(isinstance(cfg.num_tokens, int) and cfg.num_tokens > 0, "num_tokens", "a positive integer")
    cfg._require(isinstance(cfg.init, str) and (cfg.init in ("random", "vocab") or
                                                (cfg.init.startswith("text:") and len(cfg.init) > 5)), "init", INITS)
    cfg._require(cfg.tokenizer is None or isinstance(cfg.tokenizer, str), "tokenizer",
                 "None or a tokenizer name/path (e.g. tok.name_or_path)")


class PromptSource(Protocol):
    """What the hooks need from a prompt module: its length, whether it is on, and the (P, hidden) prompt."""

    active: bool
    num_tokens: int

    def prompt(self) -> torch.Tensor: ...


class SoftPrompt(DeltaModule):
    """``num_tokens`` trainable vectors in the input-embedding space.

    Routable per sample, exactly (``dt.route``): every sample's sequence gets the prompt slots, but a sample
    routed elsewhere has them masked out and its real tokens keep the positions they have without a prompt, so
    it computes what it would alone. Not gateable: a prompt cannot be scaled continuously.
    """

    routable = True
    gateable = False

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Parameter(init.detach().clone())

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[0]

    def prompt(self) -> torch.Tensor:
        return self.embedding

    def extra_summary(self) -> str:
        return f"{self.num_tokens} virtual tokens x {self.embedding.shape[1]}"


# -- initial prompts ---------------------------------------------------------------------------------

def input_embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    if embeddings is None or getattr(embeddings, "weight", None) is None:
        raise AttachError(f"prompt tuning needs the model's input embeddings (get_input_embeddings()), which "
                          f"{type(model).__name__} does not provide (a vision transformer: use dt.VisualPromptTuning)")
    return embeddings


def _text_ids(model: nn.Module, cfg: DeltaConfig) -> list[int]:
    source = cfg.tokenizer or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not source:
        raise ConfigError(f"{cfg.method}.init={cfg.init!r} needs a tokenizer: pass tokenizer='<name or path>' "
                          f"(e.g. tokenizer=tok.name_or_path); this model has no name_or_path to load one from")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg.method}.tokenizer: could not load a tokenizer from {source!r} ({e})") from e
    ids = tokenizer(cfg.init[len("text:"):], add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"{cfg.method}.init={cfg.init!r}: the text has no tokens")
    return ids


def initial_prompt(model: nn.Module, cfg: DeltaConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_tokens, hidden) starting prompt. "random": Gaussian with the embedding matrix's std (Lester et
    al. found scale matters more than the law); "vocab": rows of random tokens (the paper samples frequent
    ones); "text:...": the text's token rows, repeated or cut to num_tokens (as PEFT does)."""
    weight = input_embeddings(model).weight.detach()
    n = cfg.num_tokens
    if cfg.init == "random":
        noise = torch.randn(n, weight.shape[1], generator=generator, dtype=torch.float32)
        return (noise * weight.float().std()).to(weight)
    if cfg.init == "vocab":
        rows = torch.randint(0, weight.shape[0], (n,), generator=generator)
    else:
        ids = _text_ids(model, cfg)
        rows = torch.tensor((ids * (n // len(ids) + 1))[:n])
    return weight[rows.to(weight.device)].clone()


# -- the hooks ---------------------------------------------------------------------------------------

def cache_length(kwargs: dict) -> int:
    """Tokens already in the forward call's KV cache (``cache`` since transformers 5.24, ``past_key_values``
    before)."""
    past = next((kwargs[key] for key in ("cache", "past_key_values") if kwargs.get(key) is not None), None)
    if past is None:
        return 0
    if not hasattr(past, "get_seq_length"):
        raise StateError(f"prompt tuning needs the KV cache as a transformers Cache, got {type(past).__name__}")
    return int(past.get_seq_length())


def _batch_of(kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise StateError("prompt tuning found neither input_ids nor inputs_embeds in the model's inputs")


def _insert(tensor: torch.Tensor, at: int, n: int, value: int) -> torch.Tensor:
    """``tensor`` (batch, length, ...) with ``n`` positions of ``value`` inserted before index ``at``."""
    fill = tensor.new_full((tensor.shape[0], n, *tensor.shape[2:]), value)
    return torch.cat([tensor[:, :at], fill, tensor[:, at:]], dim=1)


def _insert_positions(pos: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """Positions (..., length) with the virtual tokens numbered on from the token before them, and the
    tokens after them shifted by ``n``: [0, 1, ...] -> [0, 1..n, 1+n, ...] for at=1."""
    start = pos[..., at - 1:at] + 1 if at else torch.zeros_like(pos[..., :1])
    virtual = start + torch.arange(n, device=pos.device, dtype=pos.dtype)
    return torch.cat([pos[..., :at], virtual, pos[..., at:] + n], dim=-1)


def _insert_per_row(tensor: torch.Tensor, at: int, n: int, rows: torch.Tensor) -> torch.Tensor:
    """A 2D mask (batch, length) with ``n`` columns inserted before ``at``: 1 in the ``rows`` routed to the
    prompt, 0 (masked out) in the others."""
    fill = rows.to(tensor.dtype).view(-1, 1).expand(-1, n)
    return torch.cat([tensor[:, :at], fill, tensor[:, at:]], dim=1)


def _drop_virtual(value: torch.Tensor, at: int, n: int, length: int) -> torch.Tensor:
    """Cut the ``n`` virtual positions out of a (batch, n + length, ...) output."""
    if value.shape[1] == length + n:
        return torch.cat([value[:, :at], value[:, at + n:]], dim=1)
    # fewer positions were computed (logits_to_keep in generation, prompt first): keep the real ones
    return value[:, -min(value.shape[1], length):] if at == 0 else value


class _PromptHooks:
    """The pre/post forward hooks of one prompt module on one model. A stack pairs each pre-hook call with
    its post-hook call (re-entrant forwards; ``always_call`` pops it even when forward raises).

    Where the prompt goes: first in a model that generates (every later token must see it); right after
    the first token otherwise, so an encoder's pooler / classification head still reads the token it was
    trained to read (BERT's [CLS], RoBERTa's <s>); encoder attention is bidirectional, so the prompt
    reaches every token either way.
    """

    def __init__(self, model: nn.Module, source: PromptSource) -> None:
        self.model, self.source = model, source
        params = inspect.signature(model.forward).parameters.values()
        self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.takes_positions = any(p.name == "position_ids" for p in params)  # per-sample routing needs them
        generates = getattr(model, "can_generate", None)
        self.at = 0 if generates is not None and generates() else 1
        self.stack: list[int | None] = []

    def before(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.stack.append(None)  # replaced by the real length once the prompt is in (popped by ``after``)
        if not self.source.active:
            return args, kwargs
        if len(args) > len(self.positional):
            raise StateError(f"{type(model).__name__} got {len(args)} positional arguments; pass inputs by name")
        kwargs = {**dict(zip(self.positional[:len(args)], args, strict=True)), **kwargs}
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise StateError(f"prompt tuning needs a 2D attention_mask (batch, length), got shape "
                             f"{tuple(mask.shape)}; a prepared 4D mask cannot be extended by the prompt")
        if cache_length(kwargs) > 0:
            self._continue(kwargs)  # the cache holds the prompt already
            return (), kwargs
        self.stack[-1] = self._insert_prompt(kwargs)
        return (), kwargs

    def _insert_prompt(self, kwargs: dict) -> int | None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if kwargs.get("input_ids") is None:
                return None  # nothing to add the prompt to; the model reports the missing input
            embeds = input_embeddings(self.model)(kwargs["input_ids"])
        at, n = self.at, self.source.num_tokens
        batch, length = embeds.shape[:2]
        prompt = self.source.prompt().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([embeds[:, :at], prompt, embeds[:, at:]], dim=1)
        rows = self._routed_rows(batch)
        if rows is not None:  # the mask and the positions then differ per row
            self._route_rows(kwargs, rows, batch, length, embeds.device)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _insert(kwargs["token_type_ids"], at, n, 0)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == length and not labels.is_floating_point():
            kwargs["labels"] = _insert(labels, at, n, -100)  # token-level labels; sequence labels stay as they are
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = _insert_positions(kwargs["cache_position"], at, n)
        if rows is None:
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = _insert(kwargs["attention_mask"], at, n, 1)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = _insert_positions(kwargs["position_ids"], at, n)
        return length

    def _routed_rows(self, batch: int) -> torch.Tensor | None:
        """(batch,) bool: the samples ``dt.route`` sends through this prompt, or None when not routed."""
        scale = self.source.sample_scale
        if scale is None:
            return None
        if scale.shape[0] != batch or not bool(((scale == 0) | (scale == 1)).all()):
            raise StateError(f"a prompt can be routed per sample with a 0/1 mask of one value per sample; got "
                             f"{tuple(scale.shape)} for a batch of {batch} (give dt.route one name per sample)")
        if not self.takes_positions:
            raise StateError(f"per-sample routing of a prompt sets each sample's position_ids, which "
                             f"{type(self.model).__name__}.forward does not take; run these samples with dt.active")
        return scale.bool()

    def _route_rows(self, kwargs: dict, rows: torch.Tensor, batch: int, length: int, device: torch.device) -> None:
        """Routed prefill: mask the prompt slots out of the other rows, and give each row explicit positions:
        the prompt's rows number on past the prompt (as alone with it), the others keep the positions they have
        without it (``arange``, as the models' own default), so both compute what they would alone."""
        at, n = self.at, self.source.num_tokens
        mask = kwargs.get("attention_mask")
        mask = torch.ones(batch, length, dtype=torch.long, device=device) if mask is None else mask
        kwargs["attention_mask"] = _insert_per_row(mask, at, n, rows)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(length, device=device).expand(batch, -1)
        pos = pos.expand(batch, -1)
        kwargs["position_ids"] = torch.where(rows.view(-1, 1), _insert_positions(pos, at, n), _insert(pos, at, n, 0))

    def _continue(self, kwargs: dict) -> None:
        """A cached step: the cache holds the prompt slots already; the mask gets them again, positions move on."""
        n = self.source.num_tokens
        mask = kwargs.get("attention_mask")
        rows = self._routed_rows(mask.shape[0] if mask is not None else _batch_of(kwargs))
        if rows is not None:
            self._continue_routed(kwargs, rows, n)
            return
        if mask is not None:
            kwargs["attention_mask"] = _insert(mask, self.at, n, 1)
        for key in ("position_ids", "cache_position"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key] + n

    def _continue_routed(self, kwargs: dict, rows: torch.Tensor, n: int) -> None:
        """Only the rows routed to the prompt move their positions on by ``n``; the cache index moves for all."""
        pos, cache_position = kwargs.get("position_ids"), kwargs.get("cache_position")
        if pos is None:
            if cache_position is None:
                raise StateError("a routed prompt needs position_ids or cache_position in cached generation")
            pos = cache_position.view(1, -1).expand(rows.shape[0], -1)
        kwargs["position_ids"] = pos + n * rows.view(-1, 1).to(pos.dtype)
        if cache_position is not None:
            kwargs["cache_position"] = cache_position + n
        mask = kwargs.get("attention_mask")
        if mask is None:  # the model would attend to every cached slot: spell out the mask the caller left out
            prompts = sum(s.num_tokens for s in self.model.__dict__.get(PROMPTS, []) if s.active)
            width = cache_length(kwargs) - prompts + pos.shape[1]
            mask = torch.ones(rows.shape[0], width, dtype=torch.long, device=pos.device)
        kwargs["attention_mask"] = _insert_per_row(mask, self.at, n, rows)

    def after(self, model: nn.Module, args: tuple, kwargs: dict, output):
        length = self.stack.pop() if self.stack else None
        if length is None or output is None or not hasattr(output, "keys"):
            return None
        at, n = self.at, self.source.num_tokens
        for key in ("logits", "last_hidden_state"):
            value = output.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 3:
                output[key] = _drop_virtual(value, at, n, length)
        states = output.get("hidden_states")
        if isinstance(states, tuple):
            output["hidden_states"] = tuple(_drop_virtual(h, at, n, length) if h.dim() >= 3 else h for h in states)
        return output


class _EncoderPrompt:
    """The hooks of one prompt on an encoder-decoder model: the prompt goes first in the encoder's input; the
    masks of the encoder and of the decoder's cross-attention get P ones in front. Not routable per sample: the
    unrouted samples' encoder positions (BART's learned ones) would move, so dt.route refuses instead of
    computing something else."""

    def __init__(self, model: nn.Module, encoder: nn.Module, source: PromptSource) -> None:
        self.model, self.source = model, source
        self.encoder_args = _positional_names(encoder)
        self.model_args = _positional_names(model)

    def _by_name(self, names: list[str], args: tuple, kwargs: dict) -> dict:
        if len(args) > len(names):
            raise StateError(f"{type(self.model).__name__} got {len(args)} positional arguments; pass inputs by name")
        if self.source.sample_scale is not None:
            raise StateError("per-sample routing (dt.route) is not supported for prompts on encoder-decoder models: "
                             "the encoder positions of the other samples would move; run them with dt.active")
        return {**dict(zip(names[:len(args)], args, strict=False)), **kwargs}

    def before_encoder(self, encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.source.active:
            return None
        kwargs = self._by_name(self.encoder_args, args, kwargs)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if kwargs.get("input_ids") is None:
                return (), kwargs  # nothing to add the prompt to; the encoder reports the missing input
            embeds = input_embeddings(self.model)(kwargs["input_ids"])
        n, (batch, length) = self.source.num_tokens, embeds.shape[:2]
        prompt = self.source.prompt().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["input_ids"], kwargs["inputs_embeds"] = None, torch.cat([prompt, embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] == length:  # not extended by the model's hook yet
            kwargs["attention_mask"] = _insert(mask, 0, n, 1)
        return (), kwargs

    def before_model(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The top-level mask serves the encoder (when it runs here) and the cross-attention: cover the prompt."""
        if not self.source.active:
            return None
        kwargs = self._by_name(self.model_args, args, kwargs)
        mask, encoded = kwargs.get("attention_mask"), kwargs.get("encoder_outputs")
        if mask is None or mask.dim() != 2:
            return (), kwargs  # no mask: every encoder position is attended, the prompt's included
        n = self.source.num_tokens
        states = encoded[0] if encoded is not None else None
        if states is None or states.shape[1] == mask.shape[1] + n:
            kwargs["attention_mask"] = _insert(mask, 0, n, 1)
        return (), kwargs


def _positional_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _install_encoder_prompt(model: nn.Module, source: DeltaModule, att: Attachment) -> None:
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    if encoder is None:
        raise AttachError(f"prompt tuning on the encoder-decoder {type(model).__name__} needs its encoder "
                          f"(get_encoder()); use dt.PrefixTuning there")
    hooks = _EncoderPrompt(model, encoder, source)
    att.hooks.append(encoder.register_forward_pre_hook(hooks.before_encoder, with_kwargs=True))
    att.hooks.append(model.register_forward_pre_hook(hooks.before_model, with_kwargs=True))


def install_prompt(model: nn.Module, source: DeltaModule, att: Attachment, leaf: str) -> None:
    """Add ``source`` (a PromptSource) at ``model.<leaf>`` and hook the model's forward; all recorded in ``att``."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        add_free_module(model, att, leaf, source)
        _install_encoder_prompt(model, source, att)
        return
    add_free_module(model, att, leaf, source)
    sources = model.__dict__.setdefault(PROMPTS, [])  # every prompt on the model, for the routed cached steps
    sources.append(source)
    att.on_detach.append(lambda: sources.remove(source))
    hooks = _PromptHooks(model, source)
    att.hooks.append(model.register_forward_pre_hook(hooks.before, with_kwargs=True))
    # prepend: with several prompts (named deltas routed together) the last one in takes its slots out first
    att.hooks.append(model.register_forward_hook(hooks.after, with_kwargs=True, always_call=True, prepend=True))


@register(PromptTuning)
def attach(model: nn.Module, cfg: PromptTuning, att: Attachment) -> None:
    install_prompt(model, SoftPrompt(initial_prompt(model, cfg)), att, "soft_prompt")
