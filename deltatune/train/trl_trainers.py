"""TRL's ``SFTTrainer`` and ``DPOTrainer`` on a deltatune model, saving only the delta.

A model with a delta attached stays a plain transformers model, so TRL (checked on 1.16) trains it as it is:
only the delta's parameters require grad, and TRL builds its optimizer from those. Two things go wrong with the
plain classes, and the two classes here fix them by overriding hooks, nothing else:

- saving: TRL's checkpoints and ``save_model`` write the whole base model (``model.safetensors``). Here they
  hold the delta (``delta.safetensors`` + ``delta_config.json``, ``dt.load``-able), as ``DeltaTrainer`` does.
- DPO's reference: TRL recovers the reference by switching adapters off only for PEFT models. For any other
  model with ``ref_model=None`` it loads a *second full copy* of the model from ``config._name_or_path``
  (``precompute_ref_log_probs=False``, the default), or, with ``precompute_ref_log_probs=True``, computes the
  reference log-probabilities once before training from the model as it is then. ``DeltaDPOTrainer`` takes the
  second path with the delta switched off (``dt.active(model, None)``): the reference is the base model, even
  for a delta loaded already trained, and no copy is held. It refuses ``precompute_ref_log_probs=False``
  without a ``ref_model`` rather than let TRL load that copy.

    delta = dt.attach(model, dt.LoRA(r=8, targets=["q_proj", "v_proj"]))
    trainer = DeltaDPOTrainer(model=model, args=DPOConfig(..., precompute_ref_log_probs=True),
                              train_dataset=pairs, processing_class=tokenizer)
    trainer.train(); trainer.save_model("out")        # out/delta.safetensors: the delta only

Limit (TRL's): a dataset first passed to ``evaluate()`` after training started is refused by TRL, which cannot
tell that the base model is still at hand; give evaluation sets as ``eval_dataset`` when building the trainer.
"""

from __future__ import annotations

from trl import DPOTrainer, SFTTrainer

from ..compose.named import active
from ..core.errors import ConfigError
from .hf import DeltaTrainer


class DeltaSFTTrainer(DeltaTrainer, SFTTrainer):
    """``trl.SFTTrainer`` whose checkpoints and ``save_model`` hold only the delta (see ``DeltaTrainer``)."""


class DeltaDPOTrainer(DeltaTrainer, DPOTrainer):
    """``trl.DPOTrainer`` with the base model (the delta switched off) as the reference, saving only the delta."""

    def __init__(self, model, ref_model=None, args=None, *more, **kwargs) -> None:
        if ref_model is None and not getattr(args, "precompute_ref_log_probs", False):
            raise ConfigError("DeltaDPOTrainer takes the reference log-probabilities from the base model (the delta "
                              "switched off) before training: set precompute_ref_log_probs=True in the DPOConfig. "
                              "Without it TRL would load a second full copy of the model as the reference")
        super().__init__(model, ref_model, args, *more, **kwargs)

    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference pass, with every delta off (TRL calls it for each batch when precomputing)."""
        with active(self.accelerator.unwrap_model(self.model), None):
            return super().compute_ref_log_probs(model, inputs)
