"""A small training job for test_determinism.py, run in a child process (``python -m``) or called directly.

Attaches each registered method (plus LoRA with dropout, and a gated LoRA + adapter) to the tiny BERT in
train mode, trains 4 AdamW steps on a random batch, and writes each delta's state and the losses to OUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import deltatune as dt
from deltatune.methods import METHODS
from tests.arch.models import ARCHS
from tests.conftest import batch, tiny_bert

VISION = {"visual_prompt"}  # vision-only methods run on the tiny ViT, with random images


def cases() -> dict[str, list]:
    found = {name: [m.config()] for name, m in METHODS.items() if not m.sees_delta}
    if "ipt" in METHODS:
        found["ipt"] = [METHODS["ipt"].config(num_tokens=4, intrinsic_dim=8)]
    if "tokens" in METHODS:  # no default: the rows of some ids the batch uses
        found["tokens"] = [METHODS["tokens"].config(token_ids=list(range(3, 100, 7)))]
    found["adapter"] = [dt.Adapter(bottleneck=8)]
    found["lora+dropout"] = [dt.LoRA(r=4, dropout=0.3, targets="all-linear")]
    found["lora+adapter+gates"] = [dt.LoRA(r=2), dt.Adapter(bottleneck=4), dt.Gates()]
    return found


def main(seed: int, out: Path) -> None:
    losses = {}
    for name, configs in sorted(cases().items()):
        torch.manual_seed(seed)  # the only seed: model init, delta init, data and dropout all follow it
        model = ARCHS["vit"].build().train() if name in VISION else tiny_bert(seed=seed).train()
        torch.manual_seed(seed)  # the ViT builder seeds itself: the delta init follows ``seed`` again
        delta = dt.attach(model, *configs, train_modules=["classifier"])
        opt = torch.optim.AdamW(delta.parameters().values(), lr=1e-2)
        ids, labels = batch(seed=seed, size=4), torch.randint(0, 2, (4,))
        inputs = {"pixel_values": torch.randn(4, 3, 16, 16)} if name in VISION else {"input_ids": ids}
        losses[name] = []
        for _ in range(4):
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
        save_file({k: v.contiguous() for k, v in delta.state_dict().items()}, out / f"{name}.safetensors")
    (out / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), Path(sys.argv[2]))
