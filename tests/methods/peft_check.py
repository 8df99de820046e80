"""Round trips through the real peft package, shared by the method tests (VeRA, LoHa, LoKr, OFT, LoRA inits)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import deltatune as dt
from tests.conftest import BUILDERS, batch, perturb


def outputs(model) -> torch.Tensor:
    """Logits and the last hidden state, flattened: the tiny BERT's 0.02-scale head shrinks changes in its logits
    to ~1e-4, so the hidden state is what shows a delta clearly above the 1e-5 tolerance."""
    with torch.no_grad():
        out = model.eval()(input_ids=batch(), output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


def export_matches_peft(tmp: Path, arch: str, config, std: float = 0.1, train=None) -> dict:
    """Attach ``config``, move its tensors off their start, export: PEFT's outputs must equal ours (1e-5),
    and differ from the base model's (so the check can fail). Returns the written adapter_config.json."""
    import peft

    model = BUILDERS[arch]()
    delta = dt.attach(model, config, train_modules=train)
    perturb(delta, std=std)
    ours = outputs(model)
    moved = (ours - outputs(BUILDERS[arch]())).abs().max()
    assert moved > 1e-3, f"the delta changes the outputs by only {moved:.2e}: the 1e-5 check would be empty"
    dt.export_peft(delta, tmp / "out")
    loaded = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp / "out")
    assert torch.allclose(outputs(loaded), ours, atol=1e-5), (outputs(loaded) - ours).abs().max()
    return json.loads((tmp / "out" / "adapter_config.json").read_text())


def import_matches_peft(tmp: Path, arch: str, peft_config) -> dt.Delta:
    """A PEFT adapter (random, not at its identity start) imported by deltatune gives PEFT's outputs (1e-5)."""
    import peft

    torch.manual_seed(3)
    pm = peft.get_peft_model(BUILDERS[arch](), peft_config)
    reference = outputs(pm)
    moved = (reference - outputs(BUILDERS[arch]())).abs().max()
    assert moved > 1e-3, f"the PEFT adapter changes the outputs by only {moved:.2e}"
    pm.save_pretrained(tmp / "in")
    model = BUILDERS[arch]()
    delta = dt.import_peft(model, tmp / "in")
    assert torch.allclose(outputs(model), reference, atol=1e-5), (outputs(model) - reference).abs().max()
    return delta
