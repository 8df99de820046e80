"""dt.extract_lora: a full fine-tune -> LoRA by truncated SVD; known ranks are recovered exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.compose.extract import extract_to_directory
from tests.conftest import BUILDERS, logits

TARGETS = {"bert": ["query", "value", "dense"], "llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def add_low_rank(model: nn.Module, targets: list[str], rank: int, seed: int = 5) -> dict[str, int]:
    """Add a random rank-``rank`` update to every weight ``targets`` select; returns path -> rank."""
    from deltatune.core.targets import find_targets, linear_types

    g = torch.Generator().manual_seed(seed)
    done = {}
    for path in find_targets(model, targets, (*linear_types(), nn.Embedding)):
        weight = model.get_submodule(path).weight
        u, v = torch.randn(weight.shape[0], rank, generator=g), torch.randn(rank, weight.shape[1], generator=g)
        with torch.no_grad():
            weight += 0.05 * u @ v
        done[path] = rank
    return done


def test_known_rank_delta_is_recovered(arch, tmp_path):
    base, tuned = BUILDERS[arch](), BUILDERS[arch]()
    changed = add_low_rank(tuned, TARGETS[arch], rank=3)
    delta = dt.extract_lora(base, tuned, r=3)
    report = delta.extraction_report
    assert {p for p, row in report.items() if p != "uncaptured" and row["rank"]} == set(changed)
    assert report["uncaptured"] == []
    for path in changed:
        assert report[path]["rank"] == 3 and report[path]["retained_energy"] == pytest.approx(1.0, abs=1e-6)
    target = logits(tuned)
    assert torch.allclose(logits(base), target, atol=1e-4)
    delta.save(tmp_path / "x")
    fresh = BUILDERS[arch]()
    dt.load(fresh, tmp_path / "x")
    assert torch.allclose(logits(fresh), target, atol=1e-4)
    delta.detach()  # the base model is the base again
    assert not torch.allclose(logits(base), target, atol=1e-3)


def test_extracted_update_is_the_best_rank_r_approximation():
    base, tuned = BUILDERS["bert"](), BUILDERS["bert"]()
    add_low_rank(tuned, ["query"], rank=6)
    delta = dt.extract_lora(base, tuned, r=2, targets=["query"])
    for path, wrapper in delta.attachments[0].wrappers().items():
        full = tuned.get_submodule(path).weight - wrapper.base_layer().weight
        s = torch.linalg.svd(full.detach().double())[1]
        err = ((full - wrapper.delta_weight()).double() ** 2).sum()
        assert torch.allclose(err, (s[2:] ** 2).sum(), rtol=1e-3)
        kept = float((s[:2] ** 2).sum() / (s ** 2).sum())
        assert delta.extraction_report[path]["retained_energy"] == pytest.approx(kept, rel=1e-4)
        assert delta.extraction_report[path]["rank"] == 2


def test_embeddings_and_uncaptured_parameters_are_reported(caplog):
    base, tuned = BUILDERS["llama"](), BUILDERS["llama"]()
    add_low_rank(tuned, ["embed_tokens"], rank=2)
    with torch.no_grad():
        tuned.model.norm.weight += 0.1
    with caplog.at_level("WARNING"):
        delta = dt.extract_lora(base, tuned, r=4, targets=["embed_tokens", "q_proj"])
    report = delta.extraction_report
    assert report["model.embed_tokens"]["rank"] == 4  # min(r, out, in): a rank-2 update keeps 2 zero directions
    assert report["model.layers.0.self_attn.q_proj"] == {"rank": 0, "retained_energy": 1.0, "norm": 0.0}
    assert report["uncaptured"] == ["model.norm.weight"] and "model.norm.weight" in caplog.text
    emb = delta.attachments[0].wrappers()["model.embed_tokens"]
    expected = tuned.model.embed_tokens.weight - emb.base_layer().weight
    assert torch.allclose(emb.delta_weight(), expected, atol=1e-5)


def test_errors():
    base = BUILDERS["bert"]()
    with pytest.raises(dt.StateError, match="nothing to extract"):
        dt.extract_lora(base, BUILDERS["bert"](), r=4)
    with pytest.raises(dt.BaseModelMismatchError, match="fine-tune of this very base"):
        dt.extract_lora(base, BUILDERS["gpt2"](), r=4)
    with pytest.raises(dt.ConfigError, match="positive integer"):
        dt.extract_lora(base, BUILDERS["bert"](), r=0)
    with pytest.raises(dt.TargetError, match="qurey"):
        dt.extract_lora(base, BUILDERS["bert"](), targets=["qurey"])
    assert dt.deltas(base) == {}


def test_extract_to_directory_loads_saved_models(tmp_path):
    base, tuned = BUILDERS["gpt2"](), BUILDERS["gpt2"]()
    add_low_rank(tuned, ["c_attn"], rank=2)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    report = extract_to_directory(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", r=2)
    assert report["transformer.h.0.attn.c_attn"]["rank"] == 2
    fresh = BUILDERS["gpt2"]()
    dt.load(fresh, tmp_path / "out")
    assert torch.allclose(logits(fresh), logits(tuned), atol=1e-4)


@pytest.fixture
def restore_logging():
    """The CLI reconfigures the 'deltatune' logger (handler, no propagation); put it back for other tests."""
    import logging

    logger = logging.getLogger("deltatune")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


def test_cli_extract_command(tmp_path, restore_logging):
    from typer.testing import CliRunner

    from deltatune.cli import app

    base, tuned = BUILDERS["bert"](), BUILDERS["bert"]()
    add_low_rank(tuned, ["query"], rank=2)
    with torch.no_grad():
        tuned.classifier.bias += 1.0
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    result = CliRunner().invoke(app, ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), "--r", "2",
                                      "--targets", "query,key", "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    assert "bert.encoder.layer.1.attention.self.query: rank 2, retained energy 1.0000" in result.output
    assert "2 target module(s) unchanged" in result.output
    assert "NOT captured (changed, but not LoRA targets): classifier.bias" in result.output
    fresh = BUILDERS["bert"]()
    dt.load(fresh, tmp_path / "lora")
    assert [a.config.targets for a in dt.deltas(fresh)["extracted"].attachments] == [
        [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]]
    bad = CliRunner().invoke(app, ["extract", str(tmp_path / "base"), str(tmp_path / "base"), "--out",
                                   str(tmp_path / "none")])
    assert bad.exit_code == 2 and "nothing to extract" in bad.output
