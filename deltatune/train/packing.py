"""Packing (``data.packing: true``): a batch's examples side by side in rows of up to ``max_length`` tokens.

The batch is the same set of examples as without packing (the same examples per step, so learning rates and
epochs mean the same); only the padding between them goes. Attention stays within each example through the
mechanism transformers itself supports: ``position_ids`` restart at 0 for every example and no
``attention_mask`` is passed, so its mask builder (``masking_utils.find_packed_sequence_indices``, transformers
5) reads the example boundaries off the position ids and blocks attention across them, for sdpa, eager and
flash attention alike. No 4-D mask is built here. A row's padding tail gets position ids 0, 1, ... too, so
it is a segment of its own that no real token attends to, and label -100.

Labels: the first token of every example is never a target (chat.py and the collate both see to it), so the
last token of one example is not trained to predict the first of the next. The loss of a packed batch is the
loss of the same examples unpacked (``check_packing`` verifies that on the model once before training).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError
from .batches import IGNORE, Encoded

CHECK_TOKENS = 24   # per example in the one-off check: enough to cross a boundary, cheap on any model
CHECK_TOLERANCE = 1e-4


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions into ``lengths`` grouped into rows of at most ``capacity`` tokens: first-fit decreasing (longest
    first, each into the first row with room), within a few percent of the fewest rows for such batches."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def tightest_rows(lengths: list[int], capacity: int, candidates: int = 32) -> list[list[int]]:
    """``pack_rows`` at the row limit (from the longest example up to ``capacity``) that leaves the fewest padded
    positions: rows are padded to the fullest one, so a limit a little under ``capacity`` often fills every row
    evenly where the full limit would leave one row short."""
    longest = max(lengths)
    step = max(1, (capacity - longest) // candidates)
    best: tuple[int, list[list[int]]] | None = None
    for limit in [*range(longest, capacity, step), capacity]:
        rows = pack_rows(lengths, limit)
        positions = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best is None or positions < best[0]:
            best = (positions, rows)
    return best[1]


def collate_packed(data: Encoded, indices: list[int], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """The examples at ``indices`` packed into rows: ``input_ids``, ``position_ids`` and ``labels``, no mask."""
    spans = [(int(data.offsets[i]), int(data.offsets[i + 1])) for i in indices]
    rows = tightest_rows([e - s for s, e in spans], max(capacity, max(e - s for s, e in spans)))
    width = max(sum(spans[j][1] - spans[j][0] for j in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full_like(ids, IGNORE)
    positions = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        at = 0
        for s, e in (spans[j] for j in row):
            ids[r, at:at + e - s] = data.input_ids[s:e]
            labels[r, at + 1:at + e - s] = data.labels[s + 1:e]  # the first token is no target
            positions[r, at:at + e - s] = torch.arange(e - s)
            at += e - s
        positions[r, at:] = torch.arange(width - at)  # the padding tail: a segment of its own
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def padding_fraction(batch: dict[str, torch.Tensor], real_tokens: int) -> float:
    """The share of a batch's positions that hold no example token."""
    return 1.0 - real_tokens / batch["input_ids"].numel()


@torch.no_grad()
def check_packing(model: nn.Module, data: Encoded, indices: list[int], pad_id: int) -> None:
    """Raise a ConfigError unless ``model`` gives two packed examples the logits it gives them one by one.

    Why a check: packing relies on the model building its attention mask with transformers' packed-sequence
    detection; a model that ignores ``position_ids`` there would silently let examples attend to each other.
    """
    picked = sorted(indices, key=lambda i: data.lengths()[i])[:2]
    if len(picked) < 2:
        return
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        short = _prefixes(data, picked, CHECK_TOKENS)
        packed = collate_packed(short, [0, 1], pad_id, 2 * CHECK_TOKENS)
        order = tightest_rows(short.lengths(), 2 * CHECK_TOKENS)[0]  # the order collate_packed placed them in
        together = model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device),
                         use_cache=False).logits[0].float()
        alone = [model(input_ids=short.input_ids[int(short.offsets[i]):int(short.offsets[i + 1])][None].to(device),
                       use_cache=False).logits[0].float() for i in order]
    finally:
        model.train(was_training)
    if not torch.allclose(together[: sum(len(a) for a in alone)], torch.cat(alone), rtol=CHECK_TOLERANCE,
                          atol=CHECK_TOLERANCE):
        raise ConfigError(f"data.packing: {type(model).__name__} does not keep packed examples apart (its outputs "
                          f"for two packed examples differ from their outputs one by one: it does not build its "
                          f"attention mask from position_ids); set data.packing: false")


def _prefixes(data: Encoded, indices: list[int], tokens: int) -> Encoded:
    """The first ``tokens`` tokens of the examples at ``indices``, as a small Encoded of their own."""
    parts = [(int(data.offsets[i]), min(int(data.offsets[i + 1]), int(data.offsets[i]) + tokens)) for i in indices]
    ids = [data.input_ids[s:e].tolist() for s, e in parts]
    return Encoded.from_lists(ids, [data.labels[s:e].tolist() for s, e in parts])

