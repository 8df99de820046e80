"""Preference tuning (``task: dpo``): ``prompt / chosen / rejected`` records, the DPO and SimPO losses.

DPO (Rafailov et al., 2023, arXiv:2305.18290), with log-probabilities summed over the response tokens::

    loss = -log sigmoid(beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))])

The reference is the base model itself: the same model with every delta switched off (``dt.active(model,
None)``), under ``no_grad`` and in eval mode, so no second copy of the model is held. A delta is the identity at
attach, so at step 0 policy == reference and the loss is exactly log 2.

SimPO (Meng et al., 2024, arXiv:2405.14734) needs no reference pass at all: length-normalised log-probabilities
and a target margin ``gamma``::

    loss = -log sigmoid(beta / |y_c| * log pi(y_c|x) - beta / |y_r| * log pi(y_r|x) - gamma)

LossAndRewards are ``beta * (log pi - log ref)`` (DPO) or ``beta / |y| * log pi`` (SimPO); reported are the reward
accuracy (chosen reward > rejected reward) and the mean reward margin, on training batches and on
``data.validation``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compose.named import active
from ..core.lm_loss import FusedLMLoss
from . import distributed
from .batches import IGNORE, Encoded, collate, eval_batches
from .config import PREFERENCE_BETA, RunConfig, TrainConfig
from .data import DataError, data_format, read_records

FIELDS = ("prompt", "chosen", "rejected")
LOSSES = ("dpo", "simpo")


# -- data -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PreferencePairs:
    """Tokenised preference pairs: ``rows`` holds the N chosen sequences, then the N rejected ones, each as
    prompt + response + EOS with the prompt's labels set to ``IGNORE`` (only the response is scored)."""

    rows: Encoded

    def __len__(self) -> int:
        return len(self.rows) // 2

    def lengths(self) -> list[int]:
        """Tokens per pair (chosen + rejected): what length-grouped batching sorts by."""
        lengths, n = self.rows.lengths(), len(self)
        return [lengths[i] + lengths[i + n] for i in range(n)]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.rows.input_ids

    label_names = None  # no classes: the loop and jobs read this on every split
    per_token_labels = True


def render_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids: a user turn plus the generation prompt in the tokenizer's chat template where
    it has one (what the model sees at inference), else the raw text with the tokenizer's special tokens."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=False))
    return tokenizer(prompt)["input_ids"]


def check_record(record: Any, where: str, number: int) -> None:
    """A record must hold ``prompt``, ``chosen`` and ``rejected`` as text, the responses not empty."""
    if not isinstance(record, dict):
        raise DataError(f"{where} record {number}: expected a record with fields {', '.join(FIELDS)}, got "
                        f"{type(record).__name__}")
    missing = [f for f in FIELDS if f not in record or record[f] is None]
    if missing:
        raise DataError(f"{where} record {number}: missing field(s) {', '.join(missing)} (it has "
                        f"{', '.join(map(str, record)) or 'none'}); every preference record needs "
                        f"{', '.join(FIELDS)}")
    for field in FIELDS:
        if not isinstance(record[field], str):
            raise DataError(f"{where} record {number}: {field} must be text, got {type(record[field]).__name__}")
    for field in ("chosen", "rejected"):
        if not record[field].strip():
            raise DataError(f"{where} record {number}: {field} is empty; a pair needs two responses to compare")


def encode_pairs(records: list[dict[str, Any]], tokenizer, max_length: int, where: str) -> PreferencePairs:
    """Tokenise every record (checked first, so a bad one fails before anything trains); a response is cut to
    fit ``max_length``, a prompt that leaves no room for any response token is an error naming the record."""
    if not records:
        raise DataError(f"{where} has no records; a preference file needs prompt / chosen / rejected records")
    for number, record in enumerate(records, 1):
        check_record(record, where, number)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chosen_ids, chosen_labels, rejected_ids, rejected_labels = [], [], [], []
    for number, record in enumerate(records, 1):
        prompt = render_prompt(tokenizer, record["prompt"])
        if len(prompt) >= max_length:
            raise DataError(f"{where} record {number}: the prompt alone is {len(prompt)} tokens, so nothing of the "
                            f"responses is left within data.max_length={max_length}; raise data.max_length or "
                            f"shorten the prompt")
        for field, ids, labels in (("chosen", chosen_ids, chosen_labels), ("rejected", rejected_ids, rejected_labels)):
            response = tokenizer(record[field], add_special_tokens=False)["input_ids"]
            full = (prompt + response + eos)[:max_length]
            ids.append(full)
            labels.append([IGNORE] * len(prompt) + full[len(prompt):])
    return PreferencePairs(Encoded.from_lists(chosen_ids + rejected_ids, chosen_labels + rejected_labels))


def load_pairs(cfg: RunConfig, tokenizer, split: str) -> PreferencePairs:
    """One split (``train`` or ``validation``) of preference records, tokenised (not cached: tokenising pairs
    is fast next to a preference step, which runs the model three times per pair)."""
    data = cfg.data
    source = data.train if split == "train" else data.validation
    where = f"data.{split} ({source})"
    if data_format(source, data.format) == "text":
        raise DataError(f"{where}: task dpo needs records with {', '.join(FIELDS)} (jsonl, json, csv, parquet), "
                        f"not a plain-text corpus")
    records = read_records(source, data, data.train_split if split == "train" else data.validation_split)
    limit = data.max_train_samples if split == "train" else data.max_eval_samples
    return encode_pairs(records[:limit], tokenizer, data.max_length, where)


def collate_pairs(data: PreferencePairs, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows: the B chosen sequences, then their B rejected ones (one forward for all)."""
    return collate(data.rows, list(indices) + [i + len(data) for i in indices], pad_id)


# -- log-probabilities and losses -------------------------------------------------------------------

LossAndRewards = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # mean loss, chosen rewards, rejected rewards


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], fused: FusedLMLoss | None = None,
                   trunk: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are.

    ``fused``: the output layer runs only on the labelled positions (the response), from the trunk's hidden
    states (``trunk``, default the model's base model), so no (rows x length x vocabulary) logits exist.
    Otherwise the model's own forward gives the logits (any delta, hook or logit transform applies)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position i predicts token i + 1
    keep = (targets != IGNORE).reshape(-1).nonzero().squeeze(1)
    if fused is not None:
        hidden = (trunk or fused.model.base_model)(**inputs, use_cache=False)[0]
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
        logits = F.linear(rows, fused.head.weight, fused.head.bias)
    else:
        logits = model(**inputs, use_cache=False).logits[:, -labels.shape[1]:]  # prompt tuning prepends tokens
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, keep)
    token_logps = -F.cross_entropy(logits.float(), targets.reshape(-1).index_select(0, keep), reduction="none")
    row = keep // labels.shape[1]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, row, token_logps)
    counts = torch.bincount(row, minlength=labels.shape[0])
    return sums, counts


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> LossAndRewards:
    """Mean DPO loss over pairs, and the per-pair rewards ``beta * (log pi - log ref)`` (chosen, rejected)."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean(), chosen_rewards, rejected_rewards


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float) -> LossAndRewards:
    """Mean SimPO loss over pairs, and the per-pair rewards ``beta * log pi / |y|`` (chosen, rejected)."""
    chosen_rewards = beta * chosen / chosen_tokens.clamp(min=1)
    rejected_rewards = beta * rejected / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean(), chosen_rewards, rejected_rewards


# -- the objective the training loop calls ----------------------------------------------------------

class PreferenceObjective:
    """What ``task: dpo`` changes in the loop: how a batch is collated, the loss of a batch, the evaluation.

    Training metrics (reward accuracy and margin) accumulate over the steps between two ``train`` records."""

    def __init__(self, model: nn.Module, loss: str = "dpo", beta: float = 0.1, gamma: float = 0.0) -> None:
        if loss not in LOSSES:
            raise DataError(f"unknown preference loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.model, self.loss_name, self.beta, self.gamma = model, loss, beta, gamma
        self.window = {"pairs": 0, "correct": 0.0, "margin": 0.0}

    @classmethod
    def from_config(cls, model: nn.Module, train: TrainConfig) -> PreferenceObjective:
        """The objective ``train.preference_loss`` / ``beta`` / ``simpo_gamma`` describe (beta resolved)."""
        return cls(model, train.preference_loss, train.beta or PREFERENCE_BETA[train.preference_loss],
                   train.simpo_gamma)

    collate = staticmethod(collate_pairs)

    def losses(self, batch: dict[str, torch.Tensor], forward: nn.Module | None = None,
               fused: FusedLMLoss | None = None, trunk: nn.Module | None = None) -> LossAndRewards:
        """(mean loss, chosen rewards, rejected rewards) of one batch from ``collate_pairs``."""
        logps, counts = sequence_logps(forward or self.model, batch, fused, trunk)
        chosen, rejected = logps.chunk(2)
        if self.loss_name == "simpo":
            return simpo_loss(chosen, rejected, *counts.chunk(2), self.beta, self.gamma)
        ref_chosen, ref_rejected = self.reference_logps(batch, fused).chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor], fused: FusedLMLoss | None = None) -> torch.Tensor:
        """Summed log-probabilities of the base model: every delta off, eval mode (no dropout), no graph."""
        was_training = self.model.training
        self.model.eval()
        try:
            with active(self.model, None):
                return sequence_logps(self.model, batch, fused)[0]
        finally:
            self.model.train(was_training)

    def loss(self, batch: dict[str, torch.Tensor], forward: nn.Module | None = None,
             fused: FusedLMLoss | None = None) -> torch.Tensor:
        """The training loss of one batch (``forward``: a compiled model; ``fused``: ``train.fused_loss``)."""
        loss, chosen, rejected = self.losses(batch, forward, fused, fused.trunk if fused is not None else None)
        self.window["pairs"] += len(chosen)
        self.window["correct"] += (chosen > rejected).sum().item()
        self.window["margin"] += (chosen - rejected).sum().item()
        return loss

    def train_metrics(self) -> dict[str, float]:
        """Reward accuracy and margin since the last call (the loop logs them with its ``train`` record)."""
        w, self.window = self.window, {"pairs": 0, "correct": 0.0, "margin": 0.0}
        pairs = max(w["pairs"], 1)
        return {"reward_accuracy": w["correct"] / pairs, "reward_margin": w["margin"] / pairs}

    @torch.no_grad()
    def evaluate(self, data: PreferencePairs, pad_id: int, batch_size: int, info: distributed.Dist,
                 dtype: torch.dtype | None = None, fused: FusedLMLoss | None = None) -> dict[str, float]:
        """``eval_loss``, ``eval_reward_accuracy``, ``eval_reward_margin`` over ``data`` (shared out among
        processes, summed back)."""
        was_training = self.model.training
        self.model.eval()
        totals = [0.0, 0, 0.0, 0.0]  # loss x pairs, pairs, correct, margin
        for indices in eval_batches(data.lengths(), batch_size, info.world, info.rank):
            batch = {k: v.to(info.device) for k, v in collate_pairs(data, indices, pad_id).items()}
            with torch.autocast(info.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                loss, chosen, rejected = self.losses(batch, fused=fused)
            totals[0] += loss.item() * len(indices)
            totals[1] += len(indices)
            totals[2] += (chosen > rejected).sum().item()
            totals[3] += (chosen - rejected).sum().item()
        self.model.train(was_training)
        parts = distributed.gather(info, totals)
        loss_sum, pairs, correct, margin = (sum(p[i] for p in parts) for i in range(4))
        pairs = max(pairs, 1)
        return {"eval_loss": loss_sum / pairs, "eval_reward_accuracy": correct / pairs,
                "eval_reward_margin": margin / pairs}
