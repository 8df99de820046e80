"""The causal-LM loss without the full logits: the output layer's product and the cross-entropy, fused, in chunks.

Why: a language model's loss step writes a (tokens x vocabulary) logit tensor, then its log-softmax, then their
gradients: four passes over 131 MB per 1,024 tokens of a 32,000-word vocabulary, several GB for a 128k
vocabulary and long sequences, often the largest tensors of a delta-tuning step. Here each chunk of tokens
gets its logits, its loss and its gradient (softmax - one-hot) at once, while the chunk is in cache; backward
only scales the gradient kept from forward (tokens x hidden, ``vocabulary / hidden`` times smaller). Tokens
with no target (label -100: padding, masked prompts) skip the output layer entirely.

Same loss as the model's own (Hugging Face's shifted, mean-over-targets cross-entropy), same gradients within
float32 rounding. ``FusedLMLoss`` checks that on the model once, and refuses models where it would not hold
(a delta on the output layer, logits transformed after it, a hook on the model's forward such as prompt tuning).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn
from .errors import DeltaError

IGNORE = -100  # Hugging Face's label for "no target here" (padding, masked prompts)
FIX = "use the model's own loss (train.fused_loss: false)"  # what to do when the fused loss does not fit
CHUNK_BYTES = 64 * 2**20  # logits per chunk: 512 tokens of a 32,000 vocabulary (256-1024 measured alike)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over rows of cross_entropy(hidden @ weight^T + bias, targets); the gradients are computed in forward,
    chunk by chunk, and backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head, rows, grad_enabled):
        wanted = [needed and grad_enabled for needed in ctx.needs_input_grad[:3]]
        grad_h = torch.empty_like(hidden) if wanted[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if wanted[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if wanted[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            use_onednn = head is not None and onednn.routes(head, h)
            logits = (onednn.matmul_t(h, weight, bias) if use_onednn else F.linear(h, weight, bias)).float()
            norm = torch.logsumexp(logits, dim=-1)
            total += (norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not any(wanted):
                continue
            p = logits.sub_(norm[:, None]).exp_()  # softmax, in place: the chunk's logits are not needed again
            p[torch.arange(len(t), device=p.device), t] -= 1.0  # d(loss)/d(logits), before the 1/N of the mean
            if grad_h is not None:
                grad_h[start:start + rows] = p.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(p.t(), h.float())
            if grad_b is not None:
                grad_b += p.sum(0)
        ctx.scale = 1.0 / max(hidden.shape[0], 1)  # no target at all: loss 0 and no gradient, not NaN
        pairs = zip((grad_h, grad_w, grad_b), (hidden, weight, bias), strict=True)
        ctx.grads = [(g, like.dtype) if g is not None else None for g, like in pairs]  # returned in the input's dtype
        return total * ctx.scale

    @staticmethod
    def backward(ctx, grad_loss):
        factor = grad_loss * ctx.scale
        grads = [None if saved is None else (saved[0] * factor).to(saved[1]) for saved in ctx.grads]
        ctx.grads = None
        return *grads, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, head: nn.Module | None = None,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (N, H) @ weight (V, H)^T + bias`` against ``targets (N,)`` (every row has a
    target), without an (N, V) tensor: ``chunk_rows`` rows at a time (default: ~64 MB of logits). ``head``: the
    layer these weights come from, so its oneDNN setting (``dt.enable_onednn``) applies."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise DeltaError(f"linear_cross_entropy: hidden must be (N, H) and targets (N,); got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    rows = chunk_rows or max(16, CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, head, rows, torch.is_grad_enabled())


def shifted_targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rows, targets) a causal LM learns from: position i predicts label i+1; positions without a target
    (-100, and each sequence's last) are dropped, so they cost no output-layer product at all."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = (targets != IGNORE).nonzero().squeeze(1)
    return flat.index_select(0, keep), targets.index_select(0, keep)


class FusedLMLoss:
    """``loss = FusedLMLoss(model)(batch)``: the causal-LM loss of ``model(**batch)`` (``batch`` has ``labels``),
    computed from the base model's last hidden state with ``linear_cross_entropy``: the logits never exist in full.

    ``trunk``: what computes the hidden states, by default ``model.base_model`` (pass a ``torch.compile``-d one
    to compile the step; the loss itself stays eager: it is products and one pass over each chunk). Refuses, with
    the reason, a model whose loss this would change; ``check(batch)`` also compares with the model's own
    forward on a slice of a real batch (``deltatune train`` does this once before training)."""

    def __init__(self, model: nn.Module, trunk: nn.Module | None = None, chunk_rows: int | None = None) -> None:
        self.model, self.chunk_rows = model, chunk_rows
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        reason = self._unsupported()
        if reason:
            raise DeltaError(f"fused LM loss: {reason}; {FIX}")
        self.trunk = trunk if trunk is not None else model.base_model

    def _unsupported(self) -> str | None:
        model, head = self.model, self.head
        if head is None:
            return f"{type(model).__name__} has no output layer (get_output_embeddings() is None): not a causal LM?"
        if type(head) is not nn.Linear:
            return (f"its output layer is a {type(head).__name__}, not a plain nn.Linear (a delta on it? leave "
                    f"lm_head out of the delta's targets)")
        if getattr(model, "base_model", model) is model:
            return f"{type(model).__name__} has no separate base model to take the hidden states from"
        if model._forward_hooks or model._forward_pre_hooks:
            return (f"hooks run around {type(model).__name__}.forward (e.g. prompt tuning's virtual tokens), and "
                    f"the fused loss calls the base model directly")
        return None

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(self.trunk, batch)

    def uncompiled(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The same loss through the model's own base model (evaluation: a compiled trunk would recompile for
        eval mode)."""
        return self._loss(self.model.base_model, batch)

    def _loss(self, trunk: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise DeltaError("fused LM loss: the batch has no 'labels' (token ids, -100 where there is no target)")
        return self._from_hidden(_hidden_states(trunk, batch), batch["labels"])

    def _from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, targets = shifted_targets(hidden, labels)
        return linear_cross_entropy(rows, self.head.weight, self.head.bias, targets, self.head, self.chunk_rows)

    @torch.no_grad()
    def check(self, batch: Mapping[str, torch.Tensor], tokens: int = 32, rtol: float = 1e-4) -> None:
        """Compare with ``model(**batch).loss`` on the first two rows' first ``tokens`` tokens, in eval mode and
        with every token a target: catches what the structure cannot show (the output layer reading something
        else than the base model's output, logits scaled or soft-capped after it)."""
        small = {k: v[:2, :tokens] for k, v in batch.items()}
        small["labels"] = small["input_ids"]
        name, was_training = type(self.model).__name__, self.model.training
        self.model.eval()
        seen: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
        try:
            out = self.model(**small, use_cache=False)
            hidden = _hidden_states(self.model.base_model, small)
            ours = self._from_hidden(hidden, small["labels"])
        finally:
            handle.remove()
            self.model.train(was_training)
        if len(seen) != 1 or seen[0].shape != hidden.shape or not torch.allclose(seen[0], hidden, rtol, 1e-5):
            raise DeltaError(f"fused LM loss: {name}'s output layer does not read its base model's last hidden "
                             f"state; {FIX}")
        if not torch.allclose(out.logits.float(), F.linear(hidden, self.head.weight, self.head.bias).float(),
                              rtol, 1e-4):
            raise DeltaError(f"fused LM loss: {name} changes the logits after its output layer (scaling or "
                             f"soft-capping); {FIX}")
        if not torch.allclose(ours.float(), out.loss.float(), rtol, 1e-5):
            raise DeltaError(f"fused LM loss: {ours.item():.6f} where {name}'s own loss is {out.loss.item():.6f}; "
                             f"{FIX}")


def _hidden_states(trunk: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return trunk(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)[0]
