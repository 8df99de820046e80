"""Intrinsic prompt tuning (IPT): the soft prompt lives in a low-dimensional subspace, prompt = decoder(z)
(Qin et al., 2021, "Exploring Universal Intrinsic Task Subspace via Prompt Tuning", arXiv:2110.07867).

The paper works in two stages: (1) *multi-task subspace finding* learns an auto-encoder over prompts trained
on many tasks; (2) *intrinsic subspace tuning* trains only the ``intrinsic_dim``-dimensional z on a new task,
the decoder frozen. Here stage (1) is ``fit_intrinsic_subspace``: PCA of the flattened prompts of several
prompt-tuning checkpoints, i.e. the optimal *linear* auto-encoder (the paper's decoder is a 2-layer MLP
trained jointly with the task losses; the linear one needs no task data and is exact for prompts that lie in
a subspace). It writes ``offset`` (the mean prompt) and ``basis`` (orthonormal rows) to a safetensors file;
``IntrinsicPromptTuning(projection=file)`` then tunes z with prompt = offset + z @ basis. Without a file the
subspace is random (seeded, as in Aghajanyan et al.'s intrinsic-dimension experiments) around the ``init``
prompt. The prompt enters the model through prompt tuning's hooks (prompt.install_prompt).

A checkpoint holds z and a SHA-256 of the decoder, so loading z onto another subspace fails loudly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.checkpoint import load_safetensors, read_meta, read_tensors
from ..core.config import DeltaConfig
from ..core.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from ..core.inject import Attachment, DeltaModule
from ..core.recipe import Recipe
from ..core.registry import register
from .prompt import check_prompt_fields, initial_prompt, input_embeddings, install_prompt


@dataclasses.dataclass
class IntrinsicPromptTuning(DeltaConfig):
    method = "ipt"
    recipe = Recipe(learning_rate=3e-3, head_learning_rate=1e-2)  # measured: BENCHMARKS.md "Defaults"

    num_tokens: int = 20          # prompt length (must match the projection's)
    intrinsic_dim: int = 250      # size of z, the only trained tensor: smaller = fewer, more constrained params
    projection: str | None = None  # file from dt.fit_intrinsic_subspace; None: a random subspace around `init`
    init: str = "random"          # centre of the random subspace (projection=None only), as PromptTuning.init
    tokenizer: str | None = None  # for init="text:..."
    seed: int = 0                 # seeds the random subspace, so dt.load rebuilds the very same decoder

    def __post_init__(self) -> None:
        if isinstance(self.projection, os.PathLike):
            self.projection = os.fspath(self.projection)  # a plain string in delta_config.json
        super().__post_init__()

    def validate(self) -> None:
        check_prompt_fields(self)
        self._require(isinstance(self.intrinsic_dim, int) and self.intrinsic_dim > 0, "intrinsic_dim",
                      "a positive integer")
        self._require(self.projection is None or isinstance(self.projection, str), "projection",
                      "None or the path of a file written by dt.fit_intrinsic_subspace")


def _digest(offset: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    h = hashlib.sha256()
    for t in (offset, basis):
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


class IntrinsicPrompt(DeltaModule):
    """prompt = (offset + z @ basis).view(num_tokens, hidden). Only z is a parameter; offset and basis are
    frozen buffers that follow ``.to()`` but are not in the model's state_dict."""

    def __init__(self, offset: torch.Tensor, basis: torch.Tensor, num_tokens: int, like: torch.Tensor) -> None:
        super().__init__()
        self.digest = _digest(offset, basis)
        self.register_buffer("offset", offset.to(like), persistent=False)
        self.register_buffer("basis", basis.to(like), persistent=False)
        self.z = nn.Parameter(torch.zeros(basis.shape[0], dtype=like.dtype, device=like.device))
        self.num_tokens = num_tokens

    def prompt(self) -> torch.Tensor:
        return (self.offset + self.z @ self.basis).view(self.num_tokens, -1)

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {"z": self.z.detach(), "decoder_sha256": self.digest}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        if not torch.equal(state["decoder_sha256"].cpu(), self.digest):
            raise CheckpointError("this IPT checkpoint's z was trained in another subspace: the decoder (projection "
                                  "file, or seed/init of the random one) differs from the one it was saved with")
        with torch.no_grad():
            self.z.copy_(state["z"])

    def extra_summary(self) -> str:
        return f"z in R^{self.z.shape[0]} -> {self.num_tokens} virtual tokens"


def _load_projection(cfg: IntrinsicPromptTuning, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(cfg.projection)
    if not path.is_file():
        raise CheckpointNotFoundError(f"ipt.projection: {path} does not exist; write it with "
                                      f"dt.fit_intrinsic_subspace([...prompt checkpoints], intrinsic_dim, path)")
    tensors = load_safetensors(path, ConfigError, "ipt.projection: ")
    if set(tensors) != {"offset", "basis"}:
        raise ConfigError(f"ipt.projection: {path} must hold 'offset' and 'basis', found {sorted(tensors)}")
    width = cfg.num_tokens * hidden
    want = {"basis": [cfg.intrinsic_dim, width], "offset": [width]}
    for key, shape in want.items():
        if list(tensors[key].shape) != shape:
            raise ConfigError(f"ipt.projection: {key} in {path} has shape {list(tensors[key].shape)}, but "
                              f"intrinsic_dim={cfg.intrinsic_dim}, num_tokens={cfg.num_tokens} and the model's "
                              f"embedding width {hidden} need {shape}")
    return tensors["offset"].float(), tensors["basis"].float()


def _random_projection(model: nn.Module, cfg: IntrinsicPromptTuning, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded: offset = the ``init`` prompt, basis = orthonormal rows spanning a random subspace."""
    width = cfg.num_tokens * hidden
    if cfg.intrinsic_dim > width:
        raise ConfigError(f"ipt.intrinsic_dim must be <= num_tokens x embedding width = {width}, "
                          f"got {cfg.intrinsic_dim}")
    generator = torch.Generator().manual_seed(cfg.seed)
    offset = initial_prompt(model, cfg, generator).float().cpu().flatten()
    gaussian = torch.randn(width, cfg.intrinsic_dim, generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(gaussian).Q.T.float()
    return offset, basis


@register(IntrinsicPromptTuning)
def attach(model: nn.Module, cfg: IntrinsicPromptTuning, att: Attachment) -> None:
    weight = input_embeddings(model).weight
    hidden = weight.shape[1]
    if cfg.projection is None:
        offset, basis = _random_projection(model, cfg, hidden)
    else:
        offset, basis = _load_projection(cfg, hidden)
    install_prompt(model, IntrinsicPrompt(offset, basis, cfg.num_tokens, weight), att, "intrinsic_prompt")


# -- stage 1: finding the subspace ---------------------------------------------------------------

def _prompt_of(source: str | os.PathLike | torch.Tensor) -> torch.Tensor:
    """The (num_tokens, hidden) prompt of a prompt-tuning checkpoint directory (or a tensor as is)."""
    if isinstance(source, torch.Tensor):
        return source.detach().float().cpu()
    where, meta = read_meta(source)
    tensors = read_tensors(where, meta)
    slots = [m.get("slot") for m in meta.get("methods", []) if m.get("config", {}).get("method") == "prompt"]
    keys = [k for k in tensors for s in slots if k.startswith(f"{s}:") and k.endswith(".embedding")]
    if len(keys) != 1:
        raise CheckpointError(f"{where} must hold exactly one prompt-tuning prompt (dt.PromptTuning) to fit a "
                              f"subspace from, found {len(keys)} (methods: "
                              f"{[m.get('config', {}).get('method') for m in meta.get('methods', [])]})")
    return tensors[keys[0]].float()


def fit_intrinsic_subspace(prompts: Sequence[str | os.PathLike | torch.Tensor], intrinsic_dim: int,
                           path: str | os.PathLike) -> Path:
    """Fit IPT's projection from prompts trained on several tasks and write it to ``path`` (safetensors).

    PCA of the flattened prompts: offset = their mean, basis = the top ``intrinsic_dim`` right singular
    vectors of the centred matrix (orthonormal rows). K prompts span at most K - 1 directions around their
    mean, so ``intrinsic_dim`` must be < K. Use the file with ``dt.IntrinsicPromptTuning(projection=path)``.

    Args:
        prompts: prompt-tuning checkpoint directories (``delta.save``), or (num_tokens, hidden) tensors.
    Raises:
        ConfigError: fewer than two prompts, shapes differ, or intrinsic_dim too large.
    """
    loaded = [_prompt_of(p) for p in prompts]
    if len(loaded) < 2:
        raise ConfigError(f"fit_intrinsic_subspace needs prompts from at least 2 tasks, got {len(loaded)}")
    shapes = sorted({tuple(p.shape) for p in loaded})
    if len(shapes) != 1:
        raise ConfigError(f"fit_intrinsic_subspace: prompts must share one (num_tokens, hidden) shape, got {shapes}")
    if not (isinstance(intrinsic_dim, int) and 0 < intrinsic_dim < len(loaded)):
        raise ConfigError(f"intrinsic_dim must be a positive integer below the number of prompts ({len(loaded)}): "
                          f"K prompts span at most K - 1 directions around their mean; got {intrinsic_dim!r}")
    flat = torch.stack([p.flatten() for p in loaded]).double()
    offset = flat.mean(dim=0)
    _, singular, vh = torch.linalg.svd(flat - offset, full_matrices=False)
    explained = (singular[:intrinsic_dim] ** 2).sum() / (singular ** 2).sum().clamp_min(1e-30)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"offset": offset.float().contiguous(), "basis": vh[:intrinsic_dim].float().contiguous()}, tmp,
              metadata={"num_tokens": str(shapes[0][0]), "hidden": str(shapes[0][1]), "num_prompts": str(len(loaded)),
                        "explained_variance": f"{explained.item():.6f}", "method": "pca"})
    os.replace(tmp, path)
    return path
