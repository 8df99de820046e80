"""Automatic delta tuning: an adaptive LoRA rank budget (budget.py), method racing (racing.py) and
hyperparameter / method search with Optuna (search.py, space.py).

Only the rank budget is imported here (the LoRA config needs it); racing and search pull in the training
loop and Optuna, so import them from their modules.
"""

from .budget import RankAllocator, RankBudget, rank_allocators

__all__ = ["RankBudget", "RankAllocator", "rank_allocators"]
