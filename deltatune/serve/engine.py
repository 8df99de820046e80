"""The model side of the server: one base model, its named deltas, and batched forwards routed per sample.

A batch mixes requests for different deltas (and the base): ``dt.route`` gives row i exactly what its own
delta gives alone, so the server runs one forward (or one ``generate``) for the whole batch instead of one per
delta. Rows are token ids already: the HTTP layer tokenizes and checks limits before anything is queued, and
decodes after, so the model thread never touches the tokenizer (fast tokenizers are not safe to share across
threads). Everything here runs on one thread (the batcher's), because routing state lives in the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..compose.named import active, deltas, get_delta
from ..compose.routing import check_routable, route
from ..core.errors import ConfigError, StateError

BASE_NAME = "base"  # the ``model`` name that selects the base model without any delta


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a generation batch picks tokens; rows batch together only with equal settings (one ``generate``)."""

    temperature: float = 0.0  # 0: greedy (deterministic); > 0: sampling at this temperature
    top_p: float = 1.0        # nucleus sampling: keep the smallest token set with this probability mass


@dataclasses.dataclass
class Row:
    """One prompt (or one text to classify) of a request."""

    delta: str | None              # a delta name; None: the base model
    ids: list[int]                 # the tokenized prompt / text
    max_new_tokens: int = 0        # generation only


@dataclasses.dataclass
class Generated:
    ids: list[int]                 # new tokens only, cut at this row's max_new_tokens and its first eos
    finish_reason: str             # "stop" (eos) or "length"


class Engine:
    """Runs batches of rows on ``model`` with per-sample routing over its named deltas.

    ``task`` is ``classification`` (``classify``) or ``causal_lm`` (``generate``). ``labels`` maps a delta name
    (or ``BASE_NAME``) to its label names; missing names fall back to the model config's ``id2label``.
    """

    def __init__(self, model: nn.Module, task: str, pad_id: int, eos_ids: Sequence[int] = (),
                 labels: dict[str, list[str]] | None = None, max_tokens: int | None = None) -> None:
        if task not in ("classification", "causal_lm"):
            raise ConfigError(f"serve: task must be classification or causal_lm, got {task!r}")
        self.model = model.eval()
        self.task = task
        self.pad_id = pad_id
        self.eos_ids = set(eos_ids) | generation_eos(model)
        self.names = sorted(deltas(model))
        if BASE_NAME in self.names:
            raise ConfigError(f"a delta may not be named {BASE_NAME!r}: that name selects the bare base model")
        for name in self.names:
            check_routable(get_delta(model, name))  # refused now, with the reason, not on the first request
        self.max_tokens = max_tokens or context_length(model)
        default = [str(v) for _, v in sorted((getattr(model.config, "id2label", None) or {}).items())]
        self.labels = {n: list((labels or {}).get(n) or default) for n in [BASE_NAME, *self.names]}
        self.device = next(model.parameters()).device
        self.mixed_batches = 0  # batches that served more than one delta (or a delta and the base) at once

    def resolve(self, name: str) -> str | None:
        """The delta a request's ``model`` field names (None for the base); StateError listing the choices."""
        if name == BASE_NAME:
            return None
        if name not in self.names:
            raise StateError(f"no delta named {name!r}; this server has {self.choices()}")
        return name

    def choices(self) -> list[str]:
        return [BASE_NAME, *self.names]

    def run(self, kind: str, sampling: Sampling | None, rows: list[Row]) -> list:
        """One batch: ``classify`` or ``generate`` (the batcher's single entry point). The rows run grouped by
        delta, so that each delta's samples are consecutive (routed layers then read views of the batch instead
        of gathering rows: core/routed_fold.py); results come back in the order of ``rows``."""
        self.mixed_batches += len({r.delta for r in rows}) > 1
        order = sorted(range(len(rows)), key=lambda i: (rows[i].delta is not None, rows[i].delta or ""))
        grouped = [rows[i] for i in order]
        found = self.classify(grouped) if kind == "classify" else self.generate(grouped, sampling or Sampling())
        results: list = [None] * len(rows)
        for i, result in zip(order, found, strict=True):
            results[i] = result
        return results

    @torch.no_grad()
    def classify(self, rows: list[Row]) -> list[list[float]]:
        """Class probabilities per row (softmax of the logits), each through its own delta and head."""
        ids, mask = pad([r.ids for r in rows], self.pad_id, left=False, device=self.device)
        with self._routed(rows):
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        return torch.softmax(logits.float(), dim=-1).tolist()

    @torch.no_grad()
    def generate(self, rows: list[Row], sampling: Sampling) -> list[Generated]:
        """Continue every prompt (left-padded, one cached ``generate``) up to the longest ``max_new_tokens``;
        each row is then cut at its own limit and first eos. Greedy rows equal what their delta gives alone."""
        ids, mask = pad([r.ids for r in rows], self.pad_id, left=True, device=self.device)
        picking = ({"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
                   if sampling.temperature > 0 else {"do_sample": False})
        with self._routed(rows):
            out = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=self.pad_id,
                                      max_new_tokens=max(r.max_new_tokens for r in rows), **picking)
        return [self._cut(out[i, ids.shape[1]:].tolist(), row.max_new_tokens) for i, row in enumerate(rows)]

    def _routed(self, rows: list[Row]) -> contextlib.AbstractContextManager:
        """Per-sample routing for a mixed batch; a batch for one delta (or the base) runs it alone, which is
        cheaper: a single active LoRA folds into the base product, routed ones each add a masked path."""
        names = {r.delta for r in rows}
        if len(names) == 1:
            return active(self.model, names.pop())
        return route(self.model, [r.delta for r in rows])

    def _cut(self, new: list[int], limit: int) -> Generated:
        new = new[:limit]
        for i, token in enumerate(new):
            if token in self.eos_ids:
                return Generated(new[:i], "stop")
        return Generated(new, "length")


def pad(rows: list[list[int]], pad_id: int, left: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask for rows of different lengths (left padding for decoders: every row's
    next token is then at the last position)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, where] = torch.tensor(row, dtype=torch.long)
        mask[i, where] = 1
    return ids.to(device), mask.to(device)


def generation_eos(model: nn.Module) -> set[int]:
    """The ids ``generate`` stops at (a model may have several, e.g. ``<|im_end|>`` besides ``</s>``)."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if found is None:
        return set()
    return {found} if isinstance(found, int) else set(found)


def context_length(model: nn.Module) -> int:
    """The most tokens (prompt + new) the model's position embeddings allow; a large number when unbounded."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 20
