"""Visual prompt tuning on a tiny ViT (methods/visual_prompt.py): prompts after [CLS], cut out of the outputs again."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTModel

import deltatune as dt
from deltatune.core.inject import named_base_parameters
from tests.arch.models import ARCHS, inputs
from tests.conftest import adam_losses


def logits(model):
    with torch.no_grad():
        return model(pixel_values=inputs("vit")["pixel_values"]).logits


def test_prompts_sit_after_cls_and_every_layer_sees_them():
    model = ARCHS["vit"].build()
    delta = dt.attach(model, dt.VisualPromptTuning(num_tokens=5), train_modules=None)
    prompt = delta.attachments[0].modules["vit.embeddings.visual_prompt"].embedding
    seen = []
    handle = model.vit.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(pixel_values=inputs("vit")["pixel_values"])
    handle.remove()
    patches = (16 // 4) ** 2
    assert seen[0].shape == (3, 1 + 5 + patches, 32)
    assert torch.equal(seen[0][:, 1:6], prompt.detach().unsqueeze(0).expand(3, -1, -1))
    delta.set_active(False)
    with torch.no_grad():
        plain = model.vit.embeddings(inputs("vit")["pixel_values"])
    assert torch.equal(seen[0][:, :1], plain[:, :1]) and torch.equal(seen[0][:, 6:], plain[:, 1:])


def test_backbone_outputs_keep_the_base_shape():
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64)).eval()
    pixels = inputs("vit")["pixel_values"]
    with torch.no_grad():
        base = model(pixel_values=pixels)
    dt.attach(model, dt.VisualPromptTuning(num_tokens=3), train_modules=None)
    with torch.no_grad():
        tuned = model(pixel_values=pixels)
    assert tuned.last_hidden_state.shape == base.last_hidden_state.shape
    assert not torch.allclose(tuned.pooler_output, base.pooler_output, atol=1e-4)


def test_trains_only_the_prompt_saves_loads_detaches(tmp_path):
    model = ARCHS["vit"].build()
    base = logits(model)
    delta = dt.attach(model, dt.VisualPromptTuning(num_tokens=4), train_modules=None)
    (prompt,) = delta.parameters().values()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["vit.embeddings.visual_prompt.embedding"]
    losses = adam_losses(model, [prompt], 8, 0.1, **inputs("vit"))
    assert losses[-1] < 0.98 * losses[0], losses
    assert all(p.grad is None for _, p in named_base_parameters(model))
    tuned = logits(model)
    delta.save(tmp_path / "ck")
    fresh = ARCHS["vit"].build()
    dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh), tuned)
    delta.set_active(False)
    assert torch.equal(logits(model), base)
    delta.set_active(True)
    delta.detach()
    assert torch.equal(logits(model), base) and not any(m._forward_hooks for m in model.modules())


def test_text_models_are_refused_pointing_to_prompt_tuning():
    with pytest.raises(dt.AttachError, match="dt.PromptTuning"):
        dt.attach(ARCHS["bert"].build(), dt.VisualPromptTuning())
    with pytest.raises(dt.AttachError, match="dt.VisualPromptTuning"):
        dt.attach(ARCHS["vit"].build(), dt.PromptTuning())


def test_not_mergeable_nor_routable_with_clear_errors():
    model = ARCHS["vit"].build()
    delta = dt.attach(model, dt.VisualPromptTuning(num_tokens=2), train_modules=None, name="v")
    with pytest.raises(dt.StateError, match="visual_prompt"):
        delta.merge()
    with pytest.raises(dt.StateError, match="visual_prompt"):
        dt.route(model, ["v", None, "v"])


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_num_tokens_is_validated(bad):
    with pytest.raises(dt.ConfigError, match="visual_prompt.num_tokens"):
        dt.VisualPromptTuning(num_tokens=bad)
