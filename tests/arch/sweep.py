"""Every registered method on every architecture of tests/arch/models.py, through the same checks.

``check(method, arch)`` returns "pass", "refused: <message>" (a clear DeltaError at attach) or "merge refused:
<message>" (everything passed but merge, refused with a clear StateError, e.g. tied embeddings), and raises
AssertionError when a check fails (or lets a crash through). Checks: attach; outputs unchanged at attach where
the method promises it; only the delta requires grad; three Adam steps on one batch lower the loss and leave
the base weights bitwise; save -> load onto a fresh model gives the same outputs; cached == uncached greedy
generate for decoders and encoder-decoders; merge / unmerge within 1e-5 where the method is mergeable.
Run as a script to print the pass / refuse / fail counts: ``python -m tests.arch.sweep``.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from collections.abc import Callable

import torch

import deltatune as dt
from deltatune.core.inject import named_base_parameters
from deltatune.core.registry import METHODS
from tests.conftest import adam_losses

from .models import ARCHS, inputs


def _last_norm(model: torch.nn.Module) -> list[str]:
    """The last normalisation layer's name: a whole module every architecture has, for TrainModules."""
    return [[n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()][-1]]


# method registry name -> the small config the sweep attaches (a function of the model, for TrainModules)
CONFIGS: dict[str, Callable[[torch.nn.Module], list]] = {
    "lora": lambda m: [dt.LoRA(r=4, alpha=8)],
    "adapter": lambda m: [dt.Adapter(bottleneck=8)],
    "bitfit": lambda m: [dt.BitFit()],
    "ia3": lambda m: [dt.IA3()],
    "prefix": lambda m: [dt.PrefixTuning(num_tokens=4)],
    "prompt": lambda m: [dt.PromptTuning(num_tokens=4)],
    "ipt": lambda m: [dt.IntrinsicPromptTuning(num_tokens=4, intrinsic_dim=8)],
    "train": lambda m: [dt.TrainModules(modules=_last_norm(m))],
    "vera": lambda m: [dt.VeRA(r=8)],
    "loha": lambda m: [dt.LoHa(r=4, alpha=8)],
    "lokr": lambda m: [dt.LoKr(r=4, alpha=8)],
    "oft": lambda m: [dt.OFT(block_size=8)],
    "sparse": lambda m: [dt.SparseFT(density=0.1)],
    "tokens": lambda m: [dt.TrainableTokens(token_ids=[5, 17, 42])],
    "visual_prompt": lambda m: [dt.VisualPromptTuning(num_tokens=4)],
    "gates": lambda m: [dt.LoRA(r=4, alpha=8), dt.Adapter(kind="pfeiffer", bottleneck=8), dt.Gates()],
}
# methods that change outputs at attach by design (virtual tokens in the attention or the input)
NOT_IDENTITY = {"prefix", "prompt", "ipt", "visual_prompt"}
LEARNING_RATE = {"ia3": 0.1, "vera": 0.1, "prompt": 0.1, "ipt": 0.1, "prefix": 0.05, "visual_prompt": 0.1}


def outputs(model: torch.nn.Module, arch: str) -> torch.Tensor:
    batch = inputs(arch)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels" or ARCHS[arch].kind == "seq2seq"}).logits


def _loss(model: torch.nn.Module, arch: str) -> torch.Tensor:
    return model(**inputs(arch)).loss


def _generate(model: torch.nn.Module, arch: str, use_cache: bool) -> torch.Tensor:
    ids = inputs(arch)["input_ids"][:2, :6]
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                              do_sample=False, use_cache=use_cache, pad_token_id=0)


def _nudge(delta: dt.Delta) -> None:
    """Move every trained tensor off its start (B = 0, l = 1), so the remaining checks see a real delta."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in delta.parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def check(method: str, arch: str) -> str:
    model = ARCHS[arch].build()
    configs = CONFIGS[method](model)
    before = outputs(model, arch)
    try:
        delta = dt.attach(model, *configs, train_modules=None, name="d")
    except dt.DeltaError as e:
        return f"refused: {type(e).__name__}: {e}"
    if method not in NOT_IDENTITY:
        assert torch.allclose(outputs(model, arch), before, atol=1e-6), "outputs changed at attach"
    trained = {id(p) for p in delta.parameters().values()}
    assert trained and trained == {id(p) for p in model.parameters() if p.requires_grad}, "wrong trainable set"

    frozen = {n: p.detach().clone() for n, p in named_base_parameters(model) if id(p) not in trained}
    losses = adam_losses(model, delta.parameters().values(), 3, LEARNING_RATE.get(method, 1e-2), **inputs(arch))
    with torch.no_grad():
        losses.append(_loss(model, arch).item())
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    assert all(torch.equal(p, frozen[n]) for n, p in named_base_parameters(model) if n in frozen), "base moved"

    _nudge(delta)
    tuned = outputs(model, arch)
    with tempfile.TemporaryDirectory() as tmp:
        delta.save(tmp)
        fresh = ARCHS[arch].build()
        dt.load(fresh, tmp)
        assert torch.allclose(outputs(fresh, arch), tuned, atol=1e-6), "save -> load changed outputs"

    if ARCHS[arch].kind in ("decoder", "seq2seq"):
        assert torch.equal(_generate(model, arch, True), _generate(model, arch, False)), "cached != uncached generate"

    if all(c.mergeable for c in delta.configs):
        try:
            delta.merge()
        except dt.StateError as e:
            return f"merge refused: {e}"
        assert torch.allclose(outputs(model, arch), tuned, atol=1e-5), "merge changed outputs"
        delta.unmerge()
        assert torch.allclose(outputs(model, arch), tuned, atol=1e-5), "unmerge changed outputs"
    return "pass"


def main() -> None:
    methods = sys.argv[1:] or sorted(METHODS)
    counts = {"pass": 0, "refused": 0, "merge refused": 0, "fail": 0}
    for arch in ARCHS:
        for method in methods:
            try:
                outcome = check(method, arch)
            except Exception as e:  # noqa: BLE001 - a script that reports every failure
                where = traceback.extract_tb(e.__traceback__)[-1]
                place = f"{where.filename.rsplit('/', 1)[-1]}:{where.lineno}"
                outcome = f"fail: {type(e).__name__}: {str(e)[:300]} ({place})"
            counts[outcome.split(":")[0]] += 1  # "merge refused" counts apart from attach refusals
            print(f"{arch:11} {method:8} {outcome[:400]}", flush=True)
    print(counts)


if __name__ == "__main__":
    main()
