"""dt.eva_init: A from the principal directions of the layers' inputs over a few batches; the model unchanged."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import BUILDERS, batch, logits


def _batches():
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, 7:] = 0  # padding: left out of the statistics
    return [{"input_ids": batch(seed=s), "attention_mask": mask} for s in (1, 2)]


def _inputs_of(model, module, batches) -> torch.Tensor:
    """The unpadded input rows ``module`` sees over ``batches``, collected by hand."""
    rows = []
    handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
            rows[-1] = rows[-1][b["attention_mask"].bool()]
    handle.remove()
    return torch.cat(rows).double()


def test_a_holds_the_top_right_singular_vectors_and_the_model_is_unchanged(arch):
    model = BUILDERS[arch]()
    before = logits(model)
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8))
    path, module = next(iter(delta.attachments[0].wrappers().items()))
    batches = _batches()
    x = _inputs_of(model, module, batches)
    shares = dt.eva_init(delta, batches)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    a = module.lora_A.detach().double()
    # the same 4-dimensional subspace (singular vectors are defined up to sign): projections agree
    assert torch.allclose(a.T @ a, vh[:4].T @ vh[:4], atol=1e-5)
    assert torch.allclose(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
    assert shares[path] == pytest.approx(float((s[:4] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
    assert set(shares) == set(delta.attachments[0].wrappers())
    assert torch.equal(logits(model), before)  # B is still zero and W untouched


def test_padding_rows_are_left_out():
    with_pad, without = BUILDERS["bert"](), BUILDERS["bert"]()
    d1 = dt.attach(with_pad, dt.LoRA(r=2, targets=["query"]), train_modules=None)
    d2 = dt.attach(without, dt.LoRA(r=2, targets=["query"]), train_modules=None)
    ids = batch()
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    dt.eva_init(d1, [{"input_ids": ids, "attention_mask": mask}])
    dt.eva_init(d2, [{"input_ids": ids}])
    a1 = with_pad.bert.encoder.layer[0].attention.self.query.lora_A.detach()
    a2 = without.bert.encoder.layer[0].attention.self.query.lora_A.detach()
    assert not torch.allclose(a1.T @ a1, a2.T @ a2, atol=1e-3)


def test_refusals_are_clear():
    model = BUILDERS["llama"]()
    trained = dt.attach(model, dt.LoRA(r=4))
    with torch.no_grad():
        next(iter(trained.attachments[0].wrappers().values())).lora_B.fill_(0.1)
    with pytest.raises(dt.StateError, match="must run before training"):
        dt.eva_init(trained, _batches())
    trained.detach()
    with pytest.raises(dt.ConfigError, match="works on plain LoRA"):
        dt.eva_init(dt.attach(model, dt.LoRA(r=4, init="pissa"), name="p"), _batches())
    dt.detach(model)
    with pytest.raises(dt.ConfigError, match="has no LoRA"):
        dt.eva_init(dt.attach(model, dt.IA3(), name="i"), _batches())
    dt.detach(model)
    with pytest.raises(dt.ConfigError, match="got no batch"):
        dt.eva_init(dt.attach(model, dt.LoRA(r=4), name="l"), [])
    assert not any(m._forward_pre_hooks for m in model.modules())  # no hook left behind
