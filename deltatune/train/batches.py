"""Tokenised examples in flat tensors, and the batches the loop draws from them.

Speed comes from three choices (the usual ones, done once here):
- dynamic padding: each batch is padded to its own longest example, not to ``max_length``;
- length-grouped batches, as HF's ``group_by_length``: a random permutation is cut into mega-batches that
  are sorted by length, so examples of similar length share a batch. Unlike HF, the batches are then
  shuffled: an epoch that runs from long to short examples cost 3 points of dev accuracy on the default
  job (0.917 -> 0.950 after the shuffle);
- no DataLoader: collating in-memory tensors is cheap, and a DataLoader iterator would draw from the
  global torch RNG, which would break exact resume.
Batch order depends only on (seed, epoch), so a resumed run sees the very same batches.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.lm_loss import IGNORE  # label id that no loss is computed for (prompt and padding tokens)

MEGABATCH = 50  # batches per sorted mega-batch: HF's choice, enough to cut padding, random enough across epochs


@dataclasses.dataclass
class Encoded:
    """A tokenised split. Example ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]``.

    ``labels`` holds one class id per example (classification) or one target id per token, aligned with
    ``input_ids`` (language modelling; ``IGNORE`` where no loss is wanted, e.g. the prompt).
    """

    input_ids: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def per_token_labels(self) -> bool:
        """Language-modelling data (no class names) has a label per token."""
        return self.label_names is None

    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "offsets": self.offsets, "labels": self.labels}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: list[int] | list[list[int]],
                   types: list[list[int]] | None = None, label_names: list[str] | None = None) -> Encoded:
        offsets = torch.tensor([0] + [len(x) for x in ids], dtype=torch.int64).cumsum(0)
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.int64)
        flat_labels = torch.tensor([t for x in labels for t in x] if label_names is None else labels, dtype=torch.int64)
        flat_types = torch.tensor([t for x in types for t in x], dtype=torch.int64) if types else None
        return cls(flat, offsets, flat_labels, flat_types, label_names)


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the examples at ``indices`` to their longest one (right padding, attention mask 0 there)."""
    starts, ends = data.offsets[indices].tolist(), data.offsets[[i + 1 for i in indices]].tolist()
    width = max(e - s for s, e in zip(starts, ends, strict=True))
    ids = torch.full((len(indices), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(indices), width), dtype=torch.int64)
    types = torch.zeros_like(ids) if data.token_type_ids is not None else None
    token_labels = torch.full_like(ids, IGNORE) if data.per_token_labels else None
    for row, (s, e) in enumerate(zip(starts, ends, strict=True)):
        ids[row, : e - s] = data.input_ids[s:e]
        mask[row, : e - s] = 1
        if types is not None:
            types[row, : e - s] = data.token_type_ids[s:e]
        if token_labels is not None:
            token_labels[row, : e - s] = data.labels[s:e]
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": token_labels if token_labels is not None else data.labels[indices]}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def train_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                  world: int = 1, rank: int = 0) -> list[list[int]]:
    """This process' batches for one epoch, a pure function of (seed, epoch, world, rank).

    Global batches of ``batch_size * world`` examples are formed first and process ``rank`` takes every
    ``world``-th example of each, so N processes see exactly the examples one process would with an N times
    larger batch. A last global batch too small to give every process an example is dropped.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = batch_size * world
    if group_by_length:
        mega = size * MEGABATCH
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda j: -lengths[j])]
    batches = [order[start:start + size] for start in range(0, len(order), size)]
    if group_by_length:  # sorted mega-batches would feed long examples first, short ones last: shuffle the order
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [b[rank::world] for b in batches if len(b) >= world]


def eval_batches(lengths: list[int], batch_size: int, world: int = 1, rank: int = 0) -> list[list[int]]:
    """Batches sorted by length (least padding; order does not matter for metrics), split across processes."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return batches[rank::world]
