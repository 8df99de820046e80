"""Generation samples for language models: greedy completions of a few fixed prompts at each evaluation.

Perplexity says how well the model predicts held-out text; a few completions show what it says. The prompts
are wrapped as the run's data was (the chat template's generation prompt for ``task: chat``, Alpaca's
template for ``instruction``), and decoding is greedy, so two evaluations differ only by what training changed.
"""

from __future__ import annotations

import torch
from torch import nn

from .chat import chat_prompt
from .data import alpaca_prompt

DEFAULT_PROMPTS = {
    "chat": ("Give three tips for staying healthy.", "What is the capital of France?"),
    "instruction": ("Give three tips for staying healthy.", "What is the capital of France?"),
    "causal_lm": ("Once upon a time", "The meaning of life is"),
}


def prompt_text(task: str, tokenizer, prompt: str, template: bool = True) -> str:
    """``prompt`` as the model was trained to see it (``template=False``: as it is)."""
    if template and task == "chat":
        return chat_prompt(tokenizer, prompt)
    if template and task == "instruction":
        return alpaca_prompt(prompt)
    return prompt


def prompt_inputs(task: str, tokenizer, prompt: str, template: bool = True) -> dict[str, torch.Tensor]:
    """Token ids and mask of the prompt; a chat template writes its own special tokens, so none are added."""
    text = prompt_text(task, tokenizer, prompt, template)
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=not (template and task == "chat"))
    return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask")}


def sample_prompts(task: str, configured: list[str] | None) -> list[str]:
    """The prompts to complete at each evaluation: as configured, else the task's defaults (none: classification)."""
    return list(configured) if configured is not None else list(DEFAULT_PROMPTS.get(task, ()))


@torch.no_grad()
def complete(model: nn.Module, tokenizer, task: str, prompts: list[str], max_new_tokens: int,
             device: torch.device) -> list[dict[str, str]]:
    """``[{"prompt", "completion"}]``: greedy completions, one prompt at a time (no padding to get wrong)."""
    was_training = model.training
    model.eval()
    samples = []
    try:
        for prompt in prompts:
            inputs = {k: v.to(device) for k, v in prompt_inputs(task, tokenizer, prompt).items()}
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            samples.append({"prompt": prompt, "completion": completion})
    finally:
        model.train(was_training)
    return samples
