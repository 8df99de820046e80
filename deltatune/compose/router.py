"""A learned router over named deltas: the model chooses each sample's delta from its input.

``router = dt.attach_router(model, ["sst2", "mrpc", "cola"])`` puts a small classifier in front of the model.
On every forward call it reads features of the input from the frozen model (``features``):
- ``"embeddings"`` (default): the attention-masked mean of the base input embeddings: one lookup, no extra
  forward pass, so routing costs little more than one delta; tells apart inputs that differ in their words;
- ``"hidden"``: the attention-masked mean of the frozen base model's last hidden states (every delta off): one
  more forward pass of the model's body per call (about twice one delta's latency), for inputs whose words
  alone do not say which delta they need (BENCHMARKS.md, "Learned routing": accuracy against cost);
- ``"tokens"``: a bag of the input's token ids and of its pairs of neighbouring ids (hashed into
  ``bigram_buckets``), each with its own learned score per delta (a fastText-like linear classifier,
  ``TokenBag``): the cheapest at inference (a lookup of ``len(names)`` numbers per token), and the one that keeps
  learning from more routing data (tens of thousands of samples, fitted in a minute or two);
and
- ``mode="hard"`` (default): picks one delta per sample and routes the batch with ``dt.route``, so each sample
  gets exactly what its delta gives alone; works for every routable method, prefix and prompt tuning included;
- ``mode="soft"``: mixes the deltas, sample i computing base + sum_k w_ik delta_k with w_i = softmax(router), a
  mixture of delta experts; only for methods whose effect can be scaled (``gateable``: LoRA, adapters, IA3).

Training: ``router.fit(batches)`` on samples labelled with their delta's name (the task or domain), a linear
probe on fixed features (seconds on a CPU). In soft mode the mixing weights also carry gradients from the task
loss into the router, so it can be trained end to end with the deltas (``router.parameters()``).
In cached generation the choice is made on the prompt (the call with an empty cache) and kept for the
generated tokens. ``router.save(dir)`` / ``dt.load_router(model, dir)``: safetensors + JSON holding the delta
names and the base model's fingerprint, so a router saved for another base model is refused.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.checkpoint import atomic_directory, check_fingerprint, fingerprint, load_safetensors
from ..core.delta import Delta, deltas_of
from ..core.errors import CheckpointError, CheckpointNotFoundError, ConfigError, StateError
from ..core.inject import DeltaWrapper
from ..methods.prompt import cache_length
from .batch_order import BatchOrder
from .named import check_switchable, get_delta, restore, snapshot
from .routing import check_routable, route

MODES = ("hard", "soft")
FEATURES = ("embeddings", "hidden", "tokens")
# what each feature kind is called in router.json (format 1 wrote the first one before ``features`` existed)
FEATURE_NAMES = {"embeddings": "mean input embedding", "hidden": "mean last hidden state of the base model",
                 "tokens": "bag of input tokens"}
BODY_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "inputs_embeds")
CONFIG_FILE, WEIGHTS_FILE = "router.json", "router.safetensors"
FORMAT_VERSION = 1


def _embedding_layer(model: nn.Module) -> nn.Embedding:
    """The base input embeddings (under any delta wrapper): the router's features come from the frozen model."""
    layer = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    layer = layer.base_layer() if isinstance(layer, DeltaWrapper) else layer
    if not isinstance(layer, nn.Embedding):
        raise StateError(f"a router reads the input embeddings, but {type(model).__name__} has no nn.Embedding "
                         f"from get_input_embeddings()")
    return layer


def _body(model: nn.Module) -> nn.Module:
    """The model without its task head (transformers' ``base_model``), whose output the ``hidden`` features pool."""
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module):
        raise StateError(f"router features='hidden' read the last hidden states of the model's body, but "
                         f"{type(model).__name__} has no base_model; use features='embeddings'")
    return body


BIGRAM_BUCKETS = 1 << 18  # hashed pairs of neighbouring tokens; 0: single tokens only
_BIGRAM_PRIME = 1_000_003


class TokenBag(nn.Module):
    """Scores per delta from the bag of a sample's tokens and token pairs: the mean of one learned vector
    (len(names) numbers) per token id and per pair bucket, plus a bias. Inputs are flat: the bag ids of all
    samples one after another (``token_bags``) and where each sample starts."""

    def __init__(self, vocab: int, outputs: int, bigram_buckets: int = BIGRAM_BUCKETS) -> None:
        super().__init__()
        self.vocab, self.bigram_buckets = vocab, bigram_buckets
        self.scores = nn.EmbeddingBag(vocab + bigram_buckets, outputs, mode="mean")
        self.bias = nn.Parameter(torch.zeros(outputs))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.scores.weight)  # no token says anything before fit
        nn.init.zeros_(self.bias)

    def forward(self, bags: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, offsets = bags
        return self.scores(ids, offsets) + self.bias


def token_bags(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab: int, bigram_buckets: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the bag ids of all samples, one after another; where each sample starts). A sample's bag: its attended
    token ids, and for each two neighbouring attended tokens a bucket id past the vocabulary (left or right
    padding alike: a pair counts where both of its tokens are attended)."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if bigram_buckets:
        pairs = vocab + (input_ids[:, :-1] * _BIGRAM_PRIME + input_ids[:, 1:]) % bigram_buckets
        input_ids = torch.cat([input_ids, pairs], 1)
        keep = torch.cat([keep, keep[:, :-1] & keep[:, 1:]], 1)
    counts = keep.sum(1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    return input_ids[keep], offsets


def _join_bags(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, offsets, start = [], [], 0
    for part_ids, part_offsets in parts:
        ids.append(part_ids)
        offsets.append(part_offsets + start)
        start += len(part_ids)
    return torch.cat(ids), torch.cat(offsets)


def _check_deltas(model: nn.Module, names: Sequence[str], mode: str, features: str = "embeddings",
                  hidden: int | None = None) -> list[Delta]:
    if mode not in MODES:
        raise ConfigError(f"router mode must be one of {MODES}, got {mode!r}")
    if features not in FEATURES:
        raise ConfigError(f"router features must be one of {FEATURES}, got {features!r}")
    if features == "tokens" and hidden:
        raise ConfigError("router features='tokens' is a linear bag of tokens (one score per token and delta); "
                          "hidden layers apply to features='embeddings' or 'hidden': drop hidden, or change features")
    if isinstance(names, str) or len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"a router chooses among at least two distinct named deltas, got {names!r}")
    deltas = [get_delta(model, n) for n in names]
    mine = fingerprint(model)["shapes_sha256"]
    other = [d.name for d in deltas if d.base_fingerprint.get("shapes_sha256") != mine]
    if other:
        raise StateError(f"deltas {other} were trained on a base model with other parameter shapes than this one; a "
                         f"router chooses among deltas of one base model: load deltas trained on this base")
    for delta in deltas:
        check_routable(delta)
        blocked = [p for a in delta.attachments for p, m in a.modules.items() if not m.gateable]
        if mode == "soft" and blocked:
            raise StateError(f"soft routing scales each delta's effect by a weight, which {blocked[:2]} of delta "
                             f"{delta.name!r} cannot take (prefix and prompt slots are on or off); use mode='hard'")
    return deltas


class Router:
    """Chooses, for every sample of every forward call, which named delta (hard) or what mix (soft) runs."""

    def __init__(self, model: nn.Module, names: Sequence[str], mode: str = "hard", hidden: int | None = None,
                 features: str = "embeddings", bigram_buckets: int = BIGRAM_BUCKETS) -> None:
        _check_deltas(model, names, mode, features, hidden)
        self.model, self.names, self.mode, self.hidden, self.features = model, list(names), mode, hidden, features
        embeddings = _embedding_layer(model)
        width = embeddings.embedding_dim
        if features == "hidden":
            body = _body(model)
            width = getattr(getattr(model, "config", None), "hidden_size", width)
            self._body_inputs = set(inspect.signature(body.forward).parameters) & set(BODY_INPUTS)
        self.fit_accuracy: float | None = None  # share of its training samples routed right, set by fit
        self._reading = False  # True while the hidden features run the body (a bare body is the model itself)
        if features == "tokens":
            self.classifier = TokenBag(embeddings.num_embeddings, len(names), bigram_buckets).to(
                embeddings.weight.device)
        else:
            layers = [nn.Linear(width, len(names))] if not hidden else [
                nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, len(names))]
            self.classifier = nn.Sequential(*layers).to(embeddings.weight.device)
        # feature standardisation, set by fit(): the mean embedding has a large shared component
        self.mean = torch.zeros(width, device=embeddings.weight.device)
        self.std = torch.ones(width, device=embeddings.weight.device)
        self._positional = [p.name for p in inspect.signature(model.forward).parameters.values()
                            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._weights: torch.Tensor | None = None  # the last choice, kept through cached generation
        self._states: list = []
        self._orders: list[BatchOrder | None] = []  # per routed call in progress: how its batch was sorted
        self._handles: list = []

    # -- what it computes --------------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        return self.classifier.parameters()

    @torch.no_grad()
    def _raw_features(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                      inputs_embeds: torch.Tensor | None, **inputs: Any) -> torch.Tensor | tuple:
        if self.features == "tokens":
            if input_ids is None:
                raise StateError("a router with features='tokens' reads token ids, but this call passes only "
                                 "inputs_embeds; pass input_ids, or use features='embeddings'")
            return token_bags(input_ids, attention_mask, self.classifier.vocab, self.classifier.bigram_buckets)
        if self.features == "hidden":
            states = self._last_hidden(input_ids=input_ids, attention_mask=attention_mask,
                                       inputs_embeds=inputs_embeds, **inputs)
        else:
            states = inputs_embeds if inputs_embeds is not None else _embedding_layer(self.model)(input_ids)
        mask = torch.ones(states.shape[:2], device=states.device) if attention_mask is None else attention_mask
        mask = mask.to(torch.float32).unsqueeze(-1)
        return (states.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def _last_hidden(self, **inputs: Any) -> torch.Tensor:
        """The frozen model's last hidden states: its body run with every delta off, the state put back after."""
        kwargs = {k: v for k, v in inputs.items() if k in self._body_inputs and v is not None}
        state = snapshot(self.model)
        self._reading = True
        try:
            for delta in deltas_of(self.model).values():
                delta.set_active(False)
                for module in delta.modules():
                    module.sample_scale = None
            out = _body(self.model)(**kwargs)
        finally:
            self._reading = False
            restore(state)
        return out[0]

    def logits(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
        """(batch, len(names)) scores from the input's features (``inputs``: e.g. token_type_ids, which the
        hidden features pass to the model)."""
        return self._scores(self._raw_features(input_ids, attention_mask, inputs_embeds, **inputs))

    def _scores(self, features: torch.Tensor | tuple) -> torch.Tensor:
        """The classifier on features as ``_raw_features`` reads them."""
        return self.classifier(self._classifier_input(features))

    def _classifier_input(self, features: torch.Tensor | tuple) -> torch.Tensor | tuple:
        """Token bags as they are, feature vectors standardised."""
        return features if self.features == "tokens" else (features - self.mean) / self.std

    def predict(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, **inputs: Any) -> list[str]:
        """The delta name each sample would be routed to (hard choice)."""
        with torch.no_grad():
            scores = self.logits(input_ids, attention_mask, inputs_embeds, **inputs)
        return [self.names[i] for i in scores.argmax(-1).tolist()]

    @property
    def last_choice(self) -> list[str] | None:
        """The delta each sample of the last routed forward call went to (its strongest weight in soft mode)."""
        return None if self._weights is None else [self.names[i] for i in self._weights.argmax(-1).tolist()]

    # -- training ----------------------------------------------------------------------------------------
    def _labelled(self, batches: Iterable[dict[str, Any]]) -> tuple[torch.Tensor | tuple, torch.Tensor]:
        features, targets = [], []
        for batch in batches:
            labels = batch.get("route")
            if labels is None:
                raise ConfigError("router.fit needs batches with a 'route' entry: each sample's delta name "
                                  "(or its index in router.names)")
            extra = {k: batch[k] for k in BODY_INPUTS[2:3] if k in batch}  # token_type_ids
            features.append(self._raw_features(batch.get("input_ids"), batch.get("attention_mask"),
                                               batch.get("inputs_embeds"), **extra))
            targets.append(self._indices(labels))
        if not features:
            raise ConfigError("router.fit got no batches")
        targets = torch.cat(targets).to(self.mean.device)
        return (_join_bags(features) if self.features == "tokens" else torch.cat(features)), targets

    def _indices(self, labels: torch.Tensor | Sequence[str | int]) -> torch.Tensor:
        if isinstance(labels, torch.Tensor):
            return labels.long()
        unknown = sorted({x for x in labels if isinstance(x, str) and x not in self.names})
        if unknown:
            raise ConfigError(f"route labels {unknown} are not among the router's deltas {self.names}")
        return torch.tensor([self.names.index(x) if isinstance(x, str) else int(x) for x in labels])

    def fit(self, batches: Iterable[dict[str, Any]], epochs: int = 100, lr: float = 1e-2,
            weight_decay: float = 1e-4, seed: int = 0) -> list[float]:
        """Train the classifier on samples labelled with their delta (``batch["route"]``: names or indices).

        The features are computed once and fixed, so each epoch is one full-batch step on (samples x width):
        cheap. Each delta's samples weigh in inversely to their number, so a task with more routing data does
        not pull the choice towards itself. Returns the loss of every epoch."""
        features, targets = self._labelled(batches)
        if self.features != "tokens":
            self.mean = features.mean(0)
            self.std = features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(self.mean)
        x = self._classifier_input(features)  # once: the features are fixed
        torch.manual_seed(seed)
        if isinstance(self.classifier, TokenBag):
            self.classifier.reset_parameters()
        else:
            for layer in self.classifier:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        counts = torch.bincount(targets, minlength=len(self.names)).clamp_min(1).float()
        balance = counts.sum() / (len(self.names) * counts)
        optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        with torch.enable_grad():
            for _ in range(epochs):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(self.classifier(x), targets, weight=balance)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        with torch.no_grad():  # on the features already read: the hidden ones cost a forward pass each
            self.fit_accuracy = float((self.classifier(x).argmax(-1) == targets).float().mean())
        return losses

    def accuracy(self, batches: Iterable[dict[str, Any]]) -> float:
        """Share of samples routed to the delta they are labelled with."""
        features, targets = self._labelled(batches)
        with torch.no_grad():
            chosen = self._scores(features).argmax(-1)
        return float((chosen == targets).float().mean())

    # -- routing the model's forward calls ------------------------------------------------------------------
    def _inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {**dict(zip(self._positional[:len(args)], args, strict=False)), **kwargs}

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._reading:
            return
        inputs = self._inputs(args, kwargs)
        if cache_length(inputs) == 0 or self._weights is None:  # a new prompt: choose; a cached step: keep
            extra = {k: inputs[k] for k in BODY_INPUTS[2:3] if inputs.get(k) is not None}
            logits = self.logits(inputs.get("input_ids"), inputs.get("attention_mask"), inputs.get("inputs_embeds"),
                                 **extra)
            self._weights = logits.softmax(-1) if self.mode == "soft" else logits.detach()
        self._states.append(snapshot(self.model))
        if self.mode == "hard":
            return self._route_sorted(inputs, self._weights.argmax(-1).tolist())
        check_switchable(self.model)
        for delta in deltas_of(self.model).values():
            delta.set_active(delta.name in self.names)
            for m in delta.modules():
                m.sample_scale = self._weights[:, self.names.index(delta.name)] if delta.name in self.names else None

    def _route_sorted(self, inputs: dict[str, Any], choice: list[int]) -> tuple[tuple, dict] | None:
        """Route the call, its batch sorted by route where that is possible and useful (compose/batch_order.py:
        why); the order is undone on the output by ``_after``."""
        order = BatchOrder.for_routes(choice) if not torch.is_grad_enabled() else None
        sorted_inputs = order.inputs(inputs) if order is not None else None
        if sorted_inputs is None:
            self._orders.append(None)
            route(self.model, [self.names[i] for i in choice])
            return None
        self._orders.append(order)
        route(self.model, [self.names[i] for i in order.sort(choice)])
        return (), sorted_inputs

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._reading or not self._states:
            return None
        restore(self._states.pop())
        order = self._orders.pop() if self.mode == "hard" and self._orders else None
        return None if order is None else order.outputs(output)

    def enable(self) -> Router:
        """Route every forward call of the model from now on (until ``disable``)."""
        if not self._handles:
            self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True, prepend=True),
                             self.model.register_forward_hook(self._after, with_kwargs=True, always_call=True)]
        return self

    def disable(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._weights = [], None

    def __enter__(self) -> Router:
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    def detach(self) -> None:
        """Stop routing and forget the router (the deltas stay attached)."""
        self.disable()
        self.model.__dict__.pop("_deltatune_router", None)

    # -- files ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"classifier.{k}": v.detach() for k, v in self.classifier.state_dict().items()}
        return {**state, "mean": self.mean, "std": self.std}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write router.safetensors + router.json atomically (the deltas are saved with ``dt.save_all``)."""
        meta = {"format_version": FORMAT_VERSION, "names": self.names, "mode": self.mode, "hidden": self.hidden,
                "features": FEATURE_NAMES[self.features], "base_model": fingerprint(self.model)}
        if isinstance(self.classifier, TokenBag):
            meta["bigram_buckets"] = self.classifier.bigram_buckets
        with atomic_directory(Path(directory)) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()}, tmp / WEIGHTS_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(directory)

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        expected = self.state_dict()
        wrong = sorted(k for k in set(expected) | set(tensors)
                       if k not in tensors or k not in expected or tensors[k].shape != expected[k].shape)
        if wrong:
            raise CheckpointError(f"{where}: router tensors {wrong} are missing or have other shapes than this "
                                  f"router's; the file was written for another router")
        device = self.mean.device
        self.classifier.load_state_dict({k[len("classifier."):]: v for k, v in tensors.items()
                                         if k.startswith("classifier.")})
        self.mean, self.std = tensors["mean"].to(device), tensors["std"].to(device)


def attach_router(model: nn.Module, names: Sequence[str], mode: str = "hard", hidden: int | None = None,
                  enable: bool = True, features: str = "embeddings", bigram_buckets: int = BIGRAM_BUCKETS) -> Router:
    """Put a learned router over the named deltas ``names`` in front of ``model`` (train it with ``fit``).

    ``hidden``: None for a linear router on the features, or the width of one hidden layer.
    ``features``: "embeddings" (mean input embedding, cheap), "hidden" (mean last hidden state of the frozen
    model: one more forward of its body per call) or "tokens" (a bag of token ids and of neighbouring pairs,
    hashed into ``bigram_buckets``; 0: single tokens only); see the module docstring.
    Raises StateError for a name that is not attached, deltas of another base model, a method that cannot be
    routed per sample (BitFit), or soft mode over prefix / prompt deltas; ConfigError for fewer than 2 names.
    """
    if "_deltatune_router" in model.__dict__:
        raise StateError("this model already has a router; call router.detach() before attaching another")
    router = Router(model, names, mode, hidden, features, bigram_buckets)
    model.__dict__["_deltatune_router"] = router
    return router.enable() if enable else router


def load_router(model: nn.Module, directory: str | os.PathLike, enable: bool = True) -> Router:
    """Attach the router saved in ``directory`` over the deltas it names (already attached, e.g. by load_all)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} is missing: {directory} was not written by router.save")
    try:
        meta = json.loads(path.read_text())
        names, mode, hidden = list(meta["names"]), meta["mode"], meta.get("hidden")
        buckets = int(meta.get("bigram_buckets", 0))
        features = {v: k for k, v in FEATURE_NAMES.items()}[meta.get("features", FEATURE_NAMES["embeddings"])]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid router description ({e})") from e
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer deltatune (router format "
                              f"{meta['format_version']}); upgrade deltatune to load it")
    check_fingerprint(meta.get("base_model", {}), model, directory)
    router = attach_router(model, names, mode, hidden, enable=False, features=features, bigram_buckets=buckets)
    try:
        router.load_state_dict(load_safetensors(directory / WEIGHTS_FILE), directory)
    except BaseException:
        router.detach()
        raise
    return router.enable() if enable else router
