"""Automatic delta tuning, as orchestration over the training loop: method racing (racing.py) and
hyperparameter / method search with Optuna (search.py, space.py, runs.py, report.py).

The adaptive LoRA rank budget is part of LoRA itself (methods/lora/budget.py).
"""
