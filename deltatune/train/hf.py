"""Training a delta with the Hugging Face ``Trainer`` instead of ``deltatune train``.

A delta-attached model trains with the plain ``transformers.Trainer`` as it is: after ``dt.attach`` only the
delta's parameters require grad, and the Trainer builds its optimizer from exactly those. What the plain
Trainer gets wrong is saving: its checkpoints hold the whole base model. ``DeltaTrainer`` saves the delta
instead (``delta.safetensors`` + ``delta_config.json``, loadable with ``dt.load``), so a checkpoint holds
only the delta plus the ``train_modules`` the user chose, next to the Trainer's own optimizer, scheduler,
RNG and trainer-state files. ``resume_from_checkpoint`` and ``load_best_model_at_end`` load the delta back.

    delta = dt.attach(model, dt.LoRA(r=8), train_modules=["classifier"])
    trainer = DeltaTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import Trainer

from ..core.checkpoint import read_meta, read_tensors, write_files
from ..core.delta import Delta, deltas_of
from ..core.errors import StateError


def _the_delta(model) -> Delta:
    table = deltas_of(model)
    if len(table) != 1:
        raise StateError(f"DeltaTrainer needs to know which delta to save: the model has {len(table)} "
                         f"({sorted(table)}); pass delta=... explicitly")
    return next(iter(table.values()))


class DeltaTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints hold only the delta (and ``train_modules``).

    It overrides the Trainer's save and load hooks ``_save``, ``_load_from_checkpoint`` and
    ``_load_best_model`` (private, but the points every adapter library overrides; checked on
    transformers 5.23).
    """

    def __init__(self, *args, delta: Delta | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delta = delta if delta is not None else _the_delta(self.model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        directory = Path(output_dir if output_dir is not None else self.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        # Into the Trainer's own directory (not core's atomic dir swap, which would replace its other files).
        write_files(directory, self.delta.state_dict(), self.delta.metadata())
        if self.processing_class is not None:
            self.processing_class.save_pretrained(directory)

    def _load_delta(self, directory: str | os.PathLike) -> None:
        where, meta = read_meta(directory)
        self.delta.load_state_dict(read_tensors(where, meta), where)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_delta(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_delta(self.state.best_model_checkpoint)
