"""Prefix tuning: trainable key/value vectors prepended in every attention layer
(Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190).

How the prefixes get into attention without copying modeling code: in transformers >= 5 every attention
module calls ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)(module, q, k, v,
mask, ...)`` *after* updating the KV cache. Attaching registers one more implementation per base kind
("deltatune_prefix_sdpa", "deltatune_prefix_eager") and points ``config._attn_implementation`` at it. It
prepends the prefixes of ``module``'s ``PrefixKV`` children to k/v, widens the mask, and calls the original
implementation. The cache never holds prefixes, so cached and uncached generation agree, and models
without a prefix attached run unchanged even if they share the config. Prefix keys are not rotated by RoPE
(like PEFT's past_key_values prefixes); with grouped-query attention they have ``num_key_value_heads`` heads.

With ``reparam_hidden`` the prefixes are produced during training by one MLP shared by all layers, from a
smaller matrix P' (the paper's reparameterisation, which stabilises training); checkpoints hold the folded,
plain prefixes, and a loaded delta is plain prefixes (``fold_prefixes`` does the same in memory).

DeBERTa's disentangled self-attention does not call the attention interface: there a ``DisentangledPrefix``
wrapper runs the module's attention with the prefix columns added (prefix_deberta.py, which says what a prefix
slot gets in place of DeBERTa's relative-position terms, and why).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..core import quant
from ..core.config import DeltaConfig
from ..core.errors import AttachError, StateError
from ..core.inject import Attachment, DeltaModule, DeltaWrapper, add_free_module, named_base_modules, wrap_module
from ..core.recipe import Recipe
from ..core.registry import register
from .prefix_deberta import disentangled_attention, is_disentangled_attention

# Attention implementations a prefix can be added to, and the name of the prefixing variant of each.
# Flash attention takes padding as unpadded sequences and flex attention a BlockMask: neither has a dense
# mask to widen, so they are refused at attach with a message.
PREFIXED = {"sdpa": "deltatune_prefix_sdpa", "eager": "deltatune_prefix_eager"}
BASE_OF = {v: k for k, v in PREFIXED.items()}

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PrefixTuning(DeltaConfig):
    method = "prefix"
    recipe = Recipe(learning_rate=3e-4, head_learning_rate=1e-2)  # measured: BENCHMARKS.md "Defaults"

    num_tokens: int = 20               # prefix length per layer: capacity and attention cost grow with it
    reparam_hidden: int | None = 512   # width of the training-time MLP (0/None: train the prefixes directly)

    def validate(self) -> None:
        self._require(isinstance(self.num_tokens, int) and self.num_tokens > 0, "num_tokens", "a positive integer")
        hidden = self.reparam_hidden
        self._require(hidden is None or (isinstance(hidden, int) and hidden >= 0), "reparam_hidden",
                      "a non-negative integer or None (0/None: no reparameterisation)")


class PrefixEncoder(DeltaModule):
    """Li & Liang's reparameterisation: every layer's prefixes = slices of MLP(P'), one MLP for all layers.

    P' has ``num_tokens`` rows of ``width`` (one key's width, as in the paper's code); the MLP is
    Linear(width, hidden) -> tanh -> Linear(hidden, sum of the layers' 2 * kv_heads * head_dim).
    """

    routable = True  # it only produces the prefixes; each layer's PrefixKV is masked per sample
    gateable = False

    def __init__(self, num_tokens: int, width: int, hidden: int, sizes: list[int], like: torch.Tensor) -> None:
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.embedding = nn.Parameter(torch.randn(num_tokens, width, **kw))
        self.mlp = nn.Sequential(nn.Linear(width, hidden, **kw), nn.Tanh(), nn.Linear(hidden, sum(sizes), **kw))
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.folded = False

    def layer_output(self, index: int) -> torch.Tensor:
        """Rows of layer ``index``: (num_tokens, 2 * kv_heads * head_dim); only that slice of the last layer runs."""
        if self.folded:
            raise StateError("internal: the prefix MLP was folded and released; its layers hold plain prefixes")
        hidden = self.mlp[1](self.mlp[0](self.embedding))
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return nn.functional.linear(hidden, self.mlp[2].weight[lo:hi], self.mlp[2].bias[lo:hi])

    def release(self) -> None:
        """Drop P' and the MLP once every layer holds plain prefixes (they no longer train or count)."""
        del self.embedding
        del self.mlp
        self.folded = True

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {}  # the layers save the folded prefixes

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        if not self.folded:
            # A loaded delta is plain prefixes: the layers take the checkpoint's tensors. Its parameters
            # change (an optimizer built before the load would update the dropped MLP, i.e. nothing).
            log.info("prefix tuning: loaded folded prefixes; the reparameterisation MLP is dropped and the "
                     "delta now holds plain prefixes (build any optimizer after loading)")
            self.release()

    def extra_summary(self) -> str:
        return "folded" if self.folded else f"reparameterisation MLP for {len(self.offsets) - 1} layers"


class PrefixKV(DeltaModule):
    """The key and value prefixes of one attention module, each (kv_heads, num_tokens, head_dim).

    Plain: two parameters. Reparameterised: computed from the shared ``PrefixEncoder`` (held by reference,
    not as a child: it lives once in the model) until ``fold`` turns them into parameters.

    Routable per sample, exactly: a sample routed elsewhere gets -inf (a False) on these slots in the attention
    mask, so softmax gives them weight 0 and the sample sees what it would see without them. Not gateable: a
    continuous gate has no exact meaning for keys inside a softmax.
    """

    routable = True
    gateable = False

    def __init__(self, shape: tuple[int, int, int], like: torch.Tensor, encoder: PrefixEncoder | None = None,
                 index: int = 0) -> None:
        super().__init__()
        self.shape = shape
        self.index = index
        object.__setattr__(self, "encoder", encoder)  # a reference, not a submodule
        # Empty tensor that follows .to(): the dtype/device a loaded checkpoint's prefixes must take.
        self.register_buffer("anchor", torch.empty(0, dtype=like.dtype, device=like.device), persistent=False)
        if encoder is None:
            # Small like HF's initializer_range: the prefixes start as near-neutral extra attention slots.
            self.key = nn.Parameter(torch.randn(shape, dtype=like.dtype, device=like.device) * 0.02)
            self.value = nn.Parameter(torch.randn(shape, dtype=like.dtype, device=like.device) * 0.02)

    @property
    def num_tokens(self) -> int:
        return self.shape[1]

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder is None:
            return self.key, self.value
        heads, tokens, dim = self.shape
        rows = self.encoder.layer_output(self.index).view(tokens, 2, heads, dim)
        return rows[:, 0].transpose(0, 1), rows[:, 1].transpose(0, 1)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP-produced prefixes by plain parameters with the same values."""
        if self.encoder is None:
            return
        key, value = self.key_value()
        self._become_plain(key, value)

    def _become_plain(self, key: torch.Tensor, value: torch.Tensor) -> None:
        object.__setattr__(self, "encoder", None)
        self.key = nn.Parameter(key.detach().to(self.anchor, copy=True))
        self.value = nn.Parameter(value.detach().to(self.anchor, copy=True))

    def saved_state(self) -> dict[str, torch.Tensor]:
        key, value = self.key_value()
        return {"key": key.detach(), "value": value.detach()}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.encoder is not None:
            self._become_plain(state["key"], state["value"])
            return
        super().load_saved_state(state)

    def extra_summary(self) -> str:
        heads, tokens, dim = self.shape
        return f"{tokens} prefix tokens x {heads} kv heads x {dim}{' (from MLP)' if self.encoder is not None else ''}"


# -- the attention implementation that adds the prefixes -------------------------------------------

def _inner_attention(module: nn.Module, base: str) -> Callable:
    """The implementation the model would use without prefixes (eager: the modeling file's own function)."""
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _widen_mask(mask: torch.Tensor | None, visible: torch.Tensor, query: torch.Tensor, kv_length: int,
                causal: bool, base: str) -> torch.Tensor | None:
    """Put the prefix slots in front of the ``kv_length`` real keys' mask.

    ``visible`` is (slots,) when every sample sees every slot, or (batch, slots) with per-sample routing.
    None stays None (no mask needed) when every slot is visible, unless sdpa would have applied ``is_causal``:
    that flag aligns the causal triangle to the top-left, which a longer key sequence would break, so the
    triangle is built here. Eager attention adds its mask to the scores, so a mask built here is additive.
    """
    batch, q_length = query.shape[0], query.shape[2]
    if mask is None:
        if visible.dim() == 1 and (base != "sdpa" or not causal or q_length == 1):
            return None
        allowed = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device)
        if causal and q_length > 1:
            allowed = allowed.tril(kv_length - q_length)
        mask = allowed.view(1, 1, q_length, kv_length)
        if base == "eager":
            mask = _additive(mask, query.dtype)
    visible = visible.view(-1, 1, 1, visible.shape[-1])
    if visible.shape[0] > 1:
        mask = mask.expand(batch, *mask.shape[1:])
    front = visible.expand(mask.shape[0], mask.shape[1], q_length, visible.shape[-1])
    front = front if mask.dtype == torch.bool else _additive(front, mask.dtype)
    return torch.cat([front, mask], dim=-1)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as an additive one: 0 where allowed, the dtype's minimum (as transformers uses) elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _visible_slots(prefixes: list[PrefixKV], batch: int) -> torch.Tensor:
    """Which prefix slots each sample sees: (slots,) all True, or (batch, slots) when some prefix is routed
    per sample (``dt.route`` sets its ``sample_scale`` to a 0/1 mask over the batch)."""
    parts = []
    for prefix in prefixes:
        scale = prefix.sample_scale
        if scale is None:
            parts.append(torch.ones(prefix.num_tokens, dtype=torch.bool, device=prefix.anchor.device))
            continue
        if scale.shape[0] != batch or not bool(((scale == 0) | (scale == 1)).all()):
            raise StateError(f"a prefix can be routed per sample with a 0/1 mask of one value per sample; got "
                             f"{tuple(scale.shape)} for a batch of {batch} (give dt.route one name per sample)")
        parts.append(scale.bool().view(-1, 1).expand(batch, prefix.num_tokens))
    if all(p.dim() == 1 for p in parts):
        return torch.cat(parts)
    return torch.cat([p.expand(batch, -1) if p.dim() == 1 else p for p in parts], dim=1)


def prefixed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs):
    """Registered as "deltatune_prefix_<base>": prepend ``module``'s active prefixes, then run <base>."""
    base = BASE_OF[module.config._attn_implementation]
    modules = [m for m in module.children() if isinstance(m, PrefixKV) and m.active]
    if modules:
        prefixes = [m.key_value() for m in modules]
        pk, pv = torch.cat([k for k, _ in prefixes], dim=1), torch.cat([v for _, v in prefixes], dim=1)
        if (pk.shape[0], pk.shape[2]) != (key.shape[1], key.shape[3]):
            raise StateError(f"prefix of {type(module).__name__} has {pk.shape[0]} heads x {pk.shape[2]} dims but "
                             f"its keys have {key.shape[1]} x {key.shape[3]}; this model's attention layout is "
                             f"not supported by prefix tuning")
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        visible = _visible_slots(modules, key.shape[0])
        attention_mask = _widen_mask(attention_mask, visible, query, key.shape[2], causal, base)
        bias = kwargs.get("position_bias")
        if isinstance(bias, torch.Tensor):  # T5-style relative bias: the prefix slots get none
            kwargs["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:-1], pk.shape[1]), bias], dim=-1)
        batch = key.shape[0]
        key = torch.cat([pk.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([pv.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
    return _inner_attention(module, base)(module, query, key, value, attention_mask, **kwargs)


class DisentangledPrefix(DeltaWrapper):
    """Runs a DeBERTa self-attention module with its ``PrefixKV`` children's prefixes (no parameters of its own:
    the prefixes stay children of the attention module, as everywhere else)."""

    routable = True  # routed per sample through the prefixes' slot masks, as prefixed_attention does

    @property
    def gateable(self) -> bool:
        return False

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, output_attentions: bool = False,
                **kwargs):
        module = self.base_layer()
        prefixes = [m for m in module.children() if isinstance(m, PrefixKV) and m.active]
        if not self.active or not prefixes:
            return self.base(hidden_states, attention_mask, output_attentions, **kwargs)
        pairs = [m.key_value() for m in prefixes]
        pk, pv = torch.cat([k for k, _ in pairs], dim=1), torch.cat([v for _, v in pairs], dim=1)
        visible = _visible_slots(prefixes, hidden_states.shape[0])
        return disentangled_attention(module, pk, pv, visible, hidden_states, attention_mask, output_attentions,
                                      **kwargs)


def _register_implementations() -> None:
    """Add the prefixing implementations to transformers' registries (idempotent; new names only, so
    models that don't use them are unaffected). Masks are built exactly as for the base implementation."""
    for base, name in PREFIXED.items():
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, prefixed_attention)
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


# -- finding attention modules ---------------------------------------------------------------------

@functools.cache
def _calls_attention_interface(cls: type) -> bool:
    """Whether ``cls.forward`` dispatches through ALL_ATTENTION_FUNCTIONS (read from its code's global names)."""
    forward = inspect.unwrap(cls.forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def attention_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in named_base_modules(model)
            if _calls_attention_interface(type(m)) and hasattr(getattr(m, "config", None), "_attn_implementation")]


def _kv_shape(module: nn.Module, num_tokens: int) -> tuple[int, int, int]:
    """(kv_heads, num_tokens, head_dim) of one attention module, from its config and the head size it keeps
    (``head_dim`` in Llama/GPT-2, ``attention_head_size`` in BERT; else hidden / heads)."""
    config = module.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = (getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
                or getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kv_heads, num_tokens, head_dim


def _check_implementations(model: nn.Module, sites: list[tuple[str, nn.Module]]) -> None:
    for path, module in sites:
        current = module.config._attn_implementation
        base = BASE_OF.get(current, current)
        if base not in PREFIXED:
            raise AttachError(f"prefix tuning needs attn_implementation 'sdpa' or 'eager', but {path} uses "
                              f"{current!r}; load the model with attn_implementation='sdpa' (or call "
                              f"model.set_attn_implementation('sdpa')) before attaching")
        if base == "eager" and not hasattr(sys.modules[type(module).__module__], "eager_attention_forward"):
            raise AttachError(f"{path} ({type(module).__name__}) uses eager attention but its modeling file has no "
                              f"eager_attention_forward to wrap; use attn_implementation='sdpa'")


def _route_attention(model: nn.Module, sites: list[tuple[str, nn.Module]], att: Attachment) -> None:
    """Point each attention config at the prefixing implementation; the undo restores the base one once no
    prefix is left in the model (another prefix delta may still need the route)."""
    _register_implementations()
    configs = {id(m.config): m.config for _, m in sites}
    for config in configs.values():
        base = BASE_OF.get(config._attn_implementation, config._attn_implementation)
        config._attn_implementation = PREFIXED[base]

        def restore(config=config, base=base) -> None:
            if not any(isinstance(m, PrefixKV) for m in model.modules()):
                config._attn_implementation = base

        att.on_detach.append(restore)


def _guard(prefix: PrefixKV, path: str, module: nn.Module, args) -> None:
    """Fail loudly instead of silently ignoring the prefix if the attention implementation was switched."""
    if prefix.active and module.config._attn_implementation not in BASE_OF:
        raise StateError(f"{path}: attn_implementation was changed to {module.config._attn_implementation!r} after "
                         f"prefix tuning was attached, so the prefix would be ignored; detach the delta, set the "
                         f"implementation ('sdpa' or 'eager'), then attach again")


def _disentangled_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in named_base_modules(model) if is_disentangled_attention(m)]


@register(PrefixTuning)
def attach(model: nn.Module, cfg: PrefixTuning, att: Attachment) -> None:
    sites = attention_sites(model)
    disentangled = _disentangled_sites(model)
    if not sites and not disentangled:
        raise AttachError(f"prefix tuning found no attention module in {type(model).__name__} that calls "
                          f"transformers' attention interface (ALL_ATTENTION_FUNCTIONS, transformers >= 5), so it "
                          f"cannot add key/value prefixes to this model; use another method (e.g. dt.LoRA)")
    _check_implementations(model, sites)
    shapes = [_kv_shape(m, cfg.num_tokens) for _, m in sites]
    shapes += [(m.num_attention_heads, cfg.num_tokens, m.attention_head_size) for _, m in disentangled]
    like = next(model.parameters())
    encoder = None
    if cfg.reparam_hidden:
        sizes = [2 * h * d for h, _, d in shapes]
        encoder = PrefixEncoder(cfg.num_tokens, max(h * d for h, _, d in shapes), cfg.reparam_hidden, sizes, like)
        add_free_module(model, att, "prefix_encoder", encoder)
    for index, ((path, module), shape) in enumerate(zip(sites + disentangled, shapes, strict=True)):
        dtype, device = quant.float_dtype(module, like)
        prefix = PrefixKV(shape, torch.empty(0, dtype=dtype, device=device), encoder, index)  # not int weights
        add_free_module(model, att, f"{path}.prefix", prefix)
        if index >= len(sites):  # DeBERTa: run its attention with the prefixes
            att.modules[path] = wrap_module(model, path, DisentangledPrefix)
        else:
            att.hooks.append(module.register_forward_pre_hook(functools.partial(_guard, prefix, path)))
    if sites:
        _route_attention(model, sites, att)


def fold_prefixes(delta) -> int:
    """Fold every reparameterised prefix of ``delta`` into plain parameters (for inference or further
    training without the MLP); outputs are unchanged. Returns how many layers were folded. Parameters
    change: build a new optimizer afterwards."""
    folded = 0
    for att in delta.attachments:
        encoders = [m for m in att.modules.values() if isinstance(m, PrefixEncoder) and not m.folded]
        for module in att.modules.values():
            if isinstance(module, PrefixKV) and module.encoder is not None:
                module.fold()
                folded += 1
        for encoder in encoders:
            encoder.release()
    return folded
