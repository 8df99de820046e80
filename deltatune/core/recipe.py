"""Training settings that work when the user sets none: one ``Recipe`` per method, declared next to the
method's config (``LoRA.recipe``), so adding a method still means adding one file.

The values come from a measured sweep (bench/quality.py; table and method in BENCHMARKS.md, advice in
docs/choosing.md), not from folklore. ``deltatune train`` fills every training key the user left unset from
``recipe_for(configs)``; code that trains by itself (a ``Trainer``, a custom loop) can read the same numbers:

    r = dt.recipe(dt.LoRA())                     # Recipe(learning_rate=..., head_learning_rate=..., ...)
    r.for_batch(4).learning_rate                 # scaled for a small batch (the documented rule)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

REFERENCE_BATCH = 16  # the global batch the recipes were measured with


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Optimizer and schedule defaults for one method (AdamW, linear decay after a warm-up)."""

    learning_rate: float                # for the delta's own parameters, at a global batch of 16
    head_learning_rate: float = 1e-3    # for modules trained in full next to the delta (a new classifier head)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06          # share of the optimizer steps spent warming up (a rule, not a count)

    def for_batch(self, global_batch: int) -> Recipe:
        """The rule for other batch sizes: below the reference batch of 16 both rates shrink with
        sqrt(global batch / 16) (Adam's square-root rule: noisier gradients, smaller steps); above it they stay
        as measured. Scaling up was measured and lost: at a batch of 32 the sqrt-scaled LoRA rate (1.41e-3)
        scored 0.8 and 1.2 points under the unscaled 1e-3 on SST-2 and MR, and the recipes already sit near
        the top of their stable range (LoRA at 2e-3 was worse, 5e-3 collapsed). Rounded to 3 significant
        digits so configs stay readable."""
        factor = min(1.0, math.sqrt(global_batch / REFERENCE_BATCH))
        return dataclasses.replace(self, learning_rate=float(f"{self.learning_rate * factor:.3g}"),
                                   head_learning_rate=float(f"{self.head_learning_rate * factor:.3g}"))


DEFAULT = Recipe(learning_rate=1e-3)  # for a method that declares none


def recipe_for(configs: Iterable[Any]) -> Recipe:
    """The recipe of a delta made of ``configs``: each field from the methods that declare a recipe.

    Several methods in one delta share one optimizer group, so the learning rate is the smallest of
    theirs (the most sensitive method sets the pace); whole modules (``train_modules``) only set the head's rate.
    """
    configs = list(configs)
    declared = [c for c in configs if getattr(c, "recipe", DEFAULT) is not DEFAULT]  # gates etc. follow the rest
    recipes = [c.recipe for c in declared if not c.trains_whole_modules]
    trains = [c.recipe for c in declared if c.trains_whole_modules]
    if not recipes:  # only whole modules train (head-only, full fine-tuning): the head's settings apply
        head = trains[0] if trains else DEFAULT
        return Recipe(learning_rate=head.head_learning_rate, head_learning_rate=head.head_learning_rate,
                      weight_decay=head.weight_decay, warmup_ratio=head.warmup_ratio)
    return Recipe(learning_rate=min(r.learning_rate for r in recipes),
                  head_learning_rate=min(r.head_learning_rate for r in recipes),
                  weight_decay=max(r.weight_decay for r in recipes),
                  warmup_ratio=max(r.warmup_ratio for r in recipes))
