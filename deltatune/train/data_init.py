"""Data-driven LoRA starts in ``deltatune train``: ``init: eva`` / ``init: corda`` call ``dt.eva_init`` on the run's
first training batches, after attach and before the first step.

Why here: ``dt.attach`` sees no data (EVA / CorDA take it through ``dt.eva_init``), and a YAML config has no
place for a call; the job has the data. The batches are the first ``DATA_INIT_BATCHES`` of epoch 0 in the
order training will see them (a pure function of the seed), so a run is reproducible and its resume redoes
the same start before loading the saved state.
"""

from __future__ import annotations

import logging
from inspect import signature
from typing import Any

import torch

from ..core.delta import Delta
from ..core.errors import ConfigError
from ..methods.lora import eva_init
from ..methods.lora.inits import DATA_INITS
from .batches import Encoded, collate, train_batches

log = logging.getLogger(__name__)
DATA_INIT_BATCHES = 8  # 128 examples at the reference batch of 16: EVA / CorDA need "a few batches"


def data_init_of(delta: Delta) -> str | None:
    """The data-driven init (``eva`` / ``corda``) one of ``delta``'s LoRA configs asks for, if any."""
    found = [c.init for c in delta.configs if getattr(c, "init", None) in DATA_INITS]
    return found[0] if found else None


def start_from_data(delta: Delta, train_set: Encoded, pad_id: int, batch_size: int, seed: int,
                    group_by_length: bool, device: torch.device, sharded: bool = False) -> dict[str, float] | None:
    """Run ``dt.eva_init`` on the first training batches when the delta asks for it; its result, else None.
    Every process computes the same start (the batches do not depend on the process)."""
    how = data_init_of(delta)
    if how is None:
        return None
    if sharded:
        raise ConfigError(f"lora.init {how!r} starts from data on the whole model; it cannot run on a sharded base "
                          f"(train.distributed: fsdp): use init 'kaiming' or train replicated")
    takes_types = "token_type_ids" in signature(delta.model.forward).parameters
    order = train_batches(train_set.lengths(), batch_size, seed, 0, group_by_length)[:DATA_INIT_BATCHES]
    batches = [_inputs(collate(train_set, indices, pad_id), takes_types, device) for indices in order]
    training = delta.model.training
    delta.model.eval()  # the statistics of the model as it is, without dropout
    try:
        shares = eva_init(delta, batches)
    finally:
        delta.model.train(training)
    log.info("init %s: %d layers started from %d batches (mean share %.3f)", how, len(shares), len(batches),
             sum(shares.values()) / max(1, len(shares)))
    return shares


def _inputs(batch: dict[str, torch.Tensor], takes_types: bool, device: torch.device) -> dict[str, Any]:
    keep = ("input_ids", "attention_mask", "token_type_ids") if takes_types else ("input_ids", "attention_mask")
    return {k: v.to(device) for k, v in batch.items() if k in keep}
