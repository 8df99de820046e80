"""Every registered method on tiny models of 16 architectures (tests/arch): a new method, or a transformers upgrade
that breaks an architecture, fails here.

Each (method, architecture) pair runs the checks of ``tests.arch.sweep.check`` (attach, identity at attach where
promised, only the delta trains, three steps lower the loss and leave the base bitwise, save -> load, cached ==
uncached generate for generating models, merge / unmerge). A pair either passes, or is listed in ``REFUSED`` /
``MERGE_REFUSED`` with the reason and must then be refused with a clear DeltaError naming it, or is a known
failure in ``KNOWN_FAILURES`` (strict xfail: fixing it makes the test say so).

``make test`` runs a representative slice (every method on BERT and Llama, every architecture with LoRA, and the
pairs that exercise architecture-specific code); the whole cross product is marked ``matrix``
(``make test-architectures``).
"""

from __future__ import annotations

import pytest

from deltatune.core.registry import METHODS
from tests.arch.models import ARCHS
from tests.arch.sweep import CONFIGS, check

NO_BIASES = "has no bias parameters"
TEXT = [a for a in ARCHS if a != "vit"]
# (method, arch) -> a phrase the AttachError / TargetError / ConfigError must contain: right answers, not gaps
REFUSED: dict[tuple[str, str], str] = {
    **{("bitfit", a): NO_BIASES for a in ("llama", "mistral", "qwen3", "phi3", "gemma", "mixtral", "qwen3-moe", "t5")},
    **{("visual_prompt", a): "For text models use dt.PromptTuning" for a in TEXT},
    ("prompt", "vit"): "use dt.VisualPromptTuning",
    ("ipt", "vit"): "use dt.VisualPromptTuning",
    ("tokens", "vit"): "no nn.Embedding input embeddings",
}
# everything passes but merge, which is refused: the embedding is tied to the output layer
MERGE_REFUSED = {("tokens", a): "is tied to" for a in ("gpt2", "gemma", "t5", "bart")}
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    # DeBERTa runs its relative-position embeddings (batch 1) through pos_key_proj / pos_query_proj: a per-sample
    # gate of the batch cannot scale a tensor all samples share; gates would have to leave those layers ungated
    ("gates", "deberta-v2"): "a per-sample gate meets DeBERTa's shared relative-position projections",
}

FAST_ARCHS = {"bert", "llama"}
ARCH_SPECIFIC = {("adapter", a) for a in ("phi3", "mixtral", "qwen3-moe")} | {
    ("ia3", a) for a in ("phi3", "mixtral", "qwen3-moe")} | {
    ("prompt", "t5"), ("prompt", "bart"), ("prefix", "t5"), ("prefix", "deberta-v2"), ("visual_prompt", "vit"),
    ("tokens", "gemma"), ("gates", "phi3")}


def _marks(method: str, arch: str) -> list:
    fast = arch in FAST_ARCHS or method == "lora" or (method, arch) in ARCH_SPECIFIC
    marks = [] if fast else [pytest.mark.matrix]
    if (method, arch) in KNOWN_FAILURES:
        marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[method, arch], strict=True))
    return marks


PAIRS = [pytest.param(m, a, id=f"{m}-{a}", marks=_marks(m, a)) for a in ARCHS for m in sorted(METHODS)]


def test_every_registered_method_has_a_sweep_config():
    assert sorted(CONFIGS) == sorted(METHODS), "add the new method to tests/arch/sweep.py CONFIGS"


def test_listed_pairs_exist():
    listed = set(REFUSED) | set(MERGE_REFUSED) | set(KNOWN_FAILURES)
    assert all(m in METHODS and a in ARCHS for m, a in listed)
    assert not set(REFUSED) & set(MERGE_REFUSED)


@pytest.mark.parametrize(("method", "arch"), PAIRS)
def test_method_on_architecture(method, arch):
    outcome = check(method, arch)
    if (method, arch) in REFUSED:
        assert outcome.startswith("refused:") and REFUSED[method, arch] in outcome, outcome
    elif (method, arch) in MERGE_REFUSED:
        assert outcome.startswith("merge refused:") and MERGE_REFUSED[method, arch] in outcome, outcome
    else:
        assert outcome == "pass", outcome
