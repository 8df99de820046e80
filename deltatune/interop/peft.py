"""PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``, for LoRA (and DoRA), VeRA,
LoHa, LoKr and OFT.

Keys look like ``base_model.model.<path>.<PEFT name>`` for a module's tensors (``lora_A.weight``,
``vera_lambda_b``, ``hada_w1_a``, ``lokr_w1``, ``oft_R.weight`` ...), ``base_model.<name>`` for tensors
shared by all modules (VeRA's ``vera_A`` / ``vera_B``) and ``base_model.model.<path>.<param>`` for
``modules_to_save``. peft is not needed at run time: ``FORMATS`` below is the whole mapping, one ``Format``
per method (how its config and tensors are named in PEFT, both ways).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..api import attach
from ..core.checkpoint import atomic_directory, read_tensors
from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import CheckpointError, CheckpointNotFoundError, StateError
from ..core.inject import Attachment, DeltaModule
from ..core.layers import ExpertBank
from ..methods.loha import LoHa
from ..methods.lokr import LoKr
from ..methods.lora import LoRA, LoRAEmbedding
from ..methods.lora.inits import RESIDUAL_INITS
from ..methods.oft import OFT
from ..methods.vera import VeRA, projections

logger = logging.getLogger(__name__)
PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"  # legacy pickle format: read only with allow_pickle=True


@dataclasses.dataclass(frozen=True)
class Format:
    """How one deltatune method is written in PEFT's format, and read back."""

    peft_type: str
    config: Callable[[Attachment], dict[str, Any]]        # PEFT config keys of this method (export)
    from_config: Callable[[dict[str, Any]], DeltaConfig]  # our config from PEFT's (import)
    names: Callable[[DeltaModule], dict[str, str]]        # our saved-state name -> PEFT key suffix
    # PEFT key suffix -> tensor of one module (export); default: the saved state under ``names``
    tensors: Callable[[DeltaModule], dict[str, torch.Tensor]] | None = None
    # tensors shared by all modules, by key after ``base_model.``: written on export, checked on import
    shared: Callable[[Attachment], dict[str, torch.Tensor]] = lambda att: {}

    def module_tensors(self, module: DeltaModule) -> dict[str, torch.Tensor]:
        if self.tensors is not None:
            return self.tensors(module)
        names = self.names(module)
        return {names[n]: t for n, t in module.saved_state().items()}


def _same_names(module: DeltaModule) -> dict[str, str]:
    """LoHa, LoKr and VeRA parameters carry PEFT's names already."""
    return {n: n for n in module.saved_state()}


def _refuse_conv1d(att: Attachment, method: str) -> None:
    conv1d = sorted(p for p, w in att.wrappers().items() if not isinstance(w.base_layer(), nn.Linear))
    if conv1d:
        raise StateError(f"PEFT has no {method} for transformers' Conv1D layers ({conv1d[:3]}: GPT-2 style); "
                         f"this delta cannot be exported to PEFT. Save it with delta.save(), or target "
                         f"nn.Linear layers.")


# -- LoRA (and DoRA) ----------------------------------------------------------------------------------

def _lora_names(module: DeltaModule) -> dict[str, str]:
    if isinstance(module, LoRAEmbedding):
        return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B", "magnitude": "lora_magnitude_vector"}
    return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


def _lora_tensors(module: DeltaModule) -> dict[str, torch.Tensor]:
    """A plain LoRA against the original weight: PiSSA / OLoRA / CorDA modules are converted (``plain_factors``)."""
    names = _lora_names(module)
    # CorDA's saved start (init_A, init_B) is folded into the rank-2r factors below, not written on its own
    state = {k: v for k, v in module.saved_state().items() if k not in ("init_A", "init_B")}
    state["lora_A"], state["lora_B"], _, _ = module.plain_factors()
    return {names[n]: t for n, t in state.items()}


def _lora_config(att: Attachment) -> dict[str, Any]:
    cfg = att.config
    wrappers = att.wrappers()
    experts = sorted(p for p, w in wrappers.items() if isinstance(w.base_layer(), ExpertBank))
    if experts:  # PEFT's target_parameters keeps one rank-r pair for all experts of a weight, not one per expert
        raise StateError(f"this LoRA reaches the fused expert weights of mixture-of-experts layers ({experts[:2]}) "
                         f"with one pair per expert, which PEFT's format cannot hold; save it with delta.save(), or "
                         f"leave 'experts' out of targets to export")
    plain = {p: w.plain_factors()[2:] for p, w in wrappers.items()}  # (r, alpha) as exported
    r, alpha = (cfg.r, cfg.alpha) if cfg.init not in RESIDUAL_INITS else next(iter(plain.values()))
    conv1d = any(not isinstance(w.base_layer(), (nn.Linear, nn.Embedding)) for w in wrappers.values())
    return {
        "r": r, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "use_dora": bool(cfg.dora),
        # a module named exactly in the config's pattern is listed even at the default value (a per-module
        # allocation such as an adaptive rank budget's stays complete and readable)
        "rank_pattern": {p: ra[0] for p, ra in plain.items() if ra[0] != r or p in cfg.rank_pattern},
        "alpha_pattern": {p: ra[1] for p, ra in plain.items() if ra[1] != alpha or p in cfg.alpha_pattern},
        "bias": "none", "fan_in_fan_out": conv1d, "init_lora_weights": True, "layers_to_transform": None,
    }


_MUTATING_INITS = ("corda", "loftq")  # PEFT initialisations that rewrite the base weight in ways we do not redo


def _lora_from_config(cfg: dict[str, Any]) -> LoRA:
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise CheckpointError("PEFT option bias is not supported by import_peft")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and (init in _MUTATING_INITS or init.startswith("pissa_niter")):
        raise CheckpointError(f"init_lora_weights={init!r} changed the base weights in a way deltatune does not "
                              f"reproduce; convert the adapter to a plain LoRA in PEFT first "
                              f"(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        targets = "re:" + targets  # PEFT treats a string as a full-match regex
    options = {"dora": True} if cfg.get("use_dora") else {}
    if init in ("pissa", "olora"):  # not converted: the base weight must be made residual again, as PEFT does
        options["init"] = init
    return LoRA(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                dropout=float(cfg.get("lora_dropout", 0.0)), targets=targets,
                layers=cfg.get("layers_to_transform"), rslora=bool(cfg.get("use_rslora", False)),
                rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
                **options)


# -- VeRA ---------------------------------------------------------------------------------------------

def _vera_shared(att: Attachment) -> dict[str, torch.Tensor]:
    """The full shared projections (PEFT saves them with save_projection=True; we regenerate them)."""
    cfg = att.config
    shapes = [(w.vera_A.shape[1], w.vera_B.shape[0]) for w in att.wrappers().values()]
    a, b = projections(cfg.r, max(i for i, _ in shapes), max(o for _, o in shapes), cfg.projection_seed)
    return {"vera_A": a, "vera_B": b}


def _vera_config(att: Attachment) -> dict[str, Any]:
    cfg = att.config
    conv1d = any(w.conv1d for w in att.wrappers().values())
    return {"r": cfg.r, "projection_prng_key": cfg.projection_seed, "save_projection": True,
            "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial, "fan_in_fan_out": conv1d, "bias": "none",
            "init_weights": True, "layers_to_transform": None}


def _vera_from_config(cfg: dict[str, Any]) -> VeRA:
    if cfg.get("bias", "none") != "none":
        raise CheckpointError("PEFT option bias is not supported by import_peft")
    return VeRA(r=int(cfg["r"]), targets=_targets(cfg), layers=cfg.get("layers_to_transform"),
                d_initial=float(cfg.get("d_initial", 0.1)), dropout=float(cfg.get("vera_dropout", 0.0)),
                projection_seed=int(cfg.get("projection_prng_key", 0)))


# -- LoHa, LoKr (LyCORIS) -----------------------------------------------------------------------------

def _lycoris_config(att: Attachment) -> dict[str, Any]:
    cfg = att.config
    _refuse_conv1d(att, type(cfg).__name__)
    extra = {}
    if isinstance(cfg, LoKr):  # PEFT spells "the divisor pair nearest sqrt" as -1
        factor = -1 if cfg.decompose_factor is None else cfg.decompose_factor
        extra = {"decompose_both": cfg.decompose_both, "decompose_factor": factor, "rank_dropout_scale": False}
    return {"r": cfg.r, "alpha": cfg.alpha, "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
            "init_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, **extra}


def _lycoris_common(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError("PEFT's rank_pattern / alpha_pattern are not supported for LoHa / LoKr by import_peft")
    dropped = {k: cfg[k] for k in ("rank_dropout", "module_dropout") if cfg.get(k)}
    if dropped:  # training-time regularisers only: the adapter's outputs do not depend on them
        logger.warning("import_peft: %s are training-only options deltatune's %s does not implement; further "
                       "training runs without them", dropped, cfg.get("peft_type"))
    return {"r": int(cfg["r"]), "alpha": float(cfg.get("alpha", 8.0)), "targets": _targets(cfg),
            "layers": cfg.get("layers_to_transform")}


def _loha_from_config(cfg: dict[str, Any]) -> LoHa:
    return LoHa(**_lycoris_common(cfg))


def _lokr_from_config(cfg: dict[str, Any]) -> LoKr:
    factor = int(cfg.get("decompose_factor", -1))
    return LoKr(**_lycoris_common(cfg), decompose_both=bool(cfg.get("decompose_both", False)),
                decompose_factor=None if factor == -1 else factor)


# -- OFT ----------------------------------------------------------------------------------------------

def _oft_config(att: Attachment) -> dict[str, Any]:
    _refuse_conv1d(att, "OFT")  # PEFT 0.21's OFT raises TypeError on Conv1D
    return {"r": 0, "oft_block_size": att.config.block_size, "module_dropout": 0.0, "coft": False, "eps": 6e-05,
            "block_share": False, "use_cayley_neumann": False, "num_cayley_neumann_terms": 5,
            "fan_in_fan_out": False, "bias": "none", "init_weights": True, "layers_to_transform": None}


def _oft_from_config(cfg: dict[str, Any]) -> OFT:
    refused = {k: cfg.get(k) for k in ("coft", "block_share", "use_cayley_neumann") if cfg.get(k)}
    if cfg.get("bias", "none") != "none":
        refused["bias"] = cfg["bias"]
    if refused:
        raise CheckpointError(f"OFT options {refused} are not supported by import_peft (deltatune's OFT is PEFT's "
                              f"exact Cayley form with one rotation per block; see deltatune/methods/oft.py)")
    if cfg.get("r") or not cfg.get("oft_block_size"):
        raise CheckpointError(f"this OFT adapter sets r={cfg.get('r')} blocks instead of oft_block_size; "
                              f"deltatune's OFT needs one block size for all modules: re-create it in PEFT "
                              f"with r=0, oft_block_size=<size>")
    if cfg.get("module_dropout"):
        logger.warning("import_peft: OFT module_dropout is a training-only option deltatune does not implement")
    return OFT(block_size=int(cfg["oft_block_size"]), targets=_targets(cfg), layers=cfg.get("layers_to_transform"))


def _targets(cfg: dict[str, Any]) -> Any:
    targets = cfg.get("target_modules")
    return "re:" + targets if isinstance(targets, str) and targets != "all-linear" else targets


# one entry per method PEFT also has; the key is deltatune's method name
FORMATS: dict[str, Format] = {
    "lora": Format("LORA", _lora_config, _lora_from_config, _lora_names, tensors=_lora_tensors),
    "vera": Format("VERA", _vera_config, _vera_from_config, _same_names, shared=_vera_shared),
    "loha": Format("LOHA", _lycoris_config, _loha_from_config, _same_names),
    "lokr": Format("LOKR", _lycoris_config, _lokr_from_config, _same_names),
    "oft": Format("OFT", _oft_config, _oft_from_config, lambda m: {"oft_R": "oft_R.weight"}),
}
_BY_PEFT_TYPE = {f.peft_type: method for method, f in FORMATS.items()}


def _exported_slot(delta: Delta) -> Attachment:
    slots = [a for a in delta.attachments if not a.config.trains_whole_modules]
    if len(slots) != 1 or slots[0].config.method not in FORMATS:
        raise StateError(f"export_peft writes exactly one method of {sorted(FORMATS)} (plus train_modules); "
                         f"delta {delta.name!r} has {[a.config.method for a in delta.attachments]}. "
                         f"Save it with delta.save() instead.")
    return slots[0]


def peft_config(delta: Delta) -> dict[str, Any]:
    att = _exported_slot(delta)
    model = delta.model
    return {
        "peft_type": FORMATS[att.config.method].peft_type, "task_type": None,
        "target_modules": sorted(att.wrappers()), "modules_to_save": list(delta.train_modules) or None,
        "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        **FORMATS[att.config.method].config(att),
    }


def export_peft(delta: Delta, directory: str | os.PathLike) -> Path:
    """Write ``delta`` (one LoRA / VeRA / LoHa / LoKr / OFT, optionally with train_modules) as a PEFT adapter
    directory that ``peft.PeftModel.from_pretrained`` loads with the same outputs.

    A LoRA with ``init="pissa"``, ``"olora"`` or ``"corda"`` is written as a plain LoRA of rank 2r against the
    *original* base weight (see ``LoRALinear.plain_factors``), as PEFT's ``convert_pissa_to_lora`` does: PEFT users
    load it onto the unmodified base model."""
    att = _exported_slot(delta)
    fmt = FORMATS[att.config.method]
    config = peft_config(delta)  # first: it refuses what PEFT cannot hold (Conv1D LoHa / LoKr / OFT)
    tensors = {f"{PREFIX}{path}.{key}": t for path, m in att.modules.items()
               for key, t in fmt.module_tensors(m).items()}
    tensors.update({SHARED_PREFIX + key: t for key, t in fmt.shared(att).items()})
    state = delta.state_dict()
    tensors.update({peft_key: state[key] for peft_key, key in _whole_module_keys(delta).items()})
    with atomic_directory(Path(directory)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS,
                  metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def import_peft(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                allow_pickle: bool = False) -> Delta:
    """Attach the adapter PEFT saved in ``directory`` (LoRA, VeRA, LoHa, LoKr or OFT) to ``model``; outputs match
    PEFT's.

    Weights are read from ``adapter_model.safetensors``. An old-style ``adapter_model.bin`` is a pickle,
    and unpickling a file can run any code it names, so it is read only with ``allow_pickle=True``, and
    then through ``torch.load(weights_only=True)``, which accepts plain tensors and refuses anything else.

    Raises:
        CheckpointNotFoundError: no adapter_config.json. CheckpointError: unusable config or weights,
        or a pickle file without ``allow_pickle=True``.
    """
    where = Path(directory)
    if not (where / CONFIG).exists():
        raise CheckpointNotFoundError(f"no PEFT adapter at {where}: {CONFIG} not found")
    try:
        cfg = json.loads((where / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where / CONFIG} is not valid JSON ({e})") from e
    config = _checked_config(cfg, where)
    tensors = _read_weights(where, allow_pickle)
    delta = attach(model, config, name=name, train_modules=cfg.get("modules_to_save") or None)
    try:
        delta.load_state_dict(_to_deltatune_keys(delta, tensors, where), where)
    except BaseException:
        delta.detach()
        raise
    return delta


def _checked_config(cfg: Any, where: Path) -> DeltaConfig:
    """Our config for a PEFT one, with every malformed-config failure turned into a CheckpointError."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where / CONFIG} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") not in _BY_PEFT_TYPE:
        raise CheckpointError(f"{where / CONFIG}: peft_type is {cfg.get('peft_type')!r}; import_peft reads "
                              f"{sorted(_BY_PEFT_TYPE)} adapters")
    unsupported = [k for k in ("layer_replication", "target_parameters", "trainable_token_indices", "layers_pattern",
                               "exclude_modules") if cfg.get(k)]
    if unsupported:
        raise CheckpointError(f"{where / CONFIG}: PEFT options {unsupported} are not supported by import_peft")
    try:
        return FORMATS[_BY_PEFT_TYPE[cfg["peft_type"]]].from_config(cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{where / CONFIG}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:  # ValueError includes ConfigError (lora.r must be ...)
        title = {"LORA": "LoRA", "VERA": "VeRA", "LOHA": "LoHa", "LOKR": "LoKr"}.get(cfg["peft_type"], cfg["peft_type"])
        raise CheckpointError(f"{where / CONFIG} has unusable {title} settings: {e}. Re-export the "
                              f"adapter with PEFT, or fix the file.") from e


def _read_weights(where: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (where / WEIGHTS).exists() or not (where / PICKLE_WEIGHTS).exists():
        return read_tensors(where, {"tensors": {"file": WEIGHTS}})
    if not allow_pickle:
        raise CheckpointError(f"{where} holds its weights as {PICKLE_WEIGHTS}, a pickle file; loading a pickle can "
                              f"run arbitrary code. If you trust its source, pass allow_pickle=True (it is then "
                              f"read with torch.load(weights_only=True)); better, re-save the adapter with PEFT's "
                              f"safe_serialization=True to get {WEIGHTS}.")
    path = where / PICKLE_WEIGHTS
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a forbidden global), RuntimeError/EOFError (truncated
        # or not a torch file): all mean "not a plain tensor file", which is all this message needs to say
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} was refused by torch.load(weights_only=True): {first}. It holds something "
                              f"other than plain tensors (possibly malicious) or is corrupt; do not use it.") from e
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise CheckpointError(f"{path} does not hold a mapping of names to tensors; it is not a PEFT adapter")
    return state


def _whole_module_keys(delta: Delta) -> dict[str, str]:
    """PEFT key -> deltatune key of every tensor of the whole modules the delta trains (PEFT's modules_to_save)."""
    return {PREFIX + key.split(":", 1)[1]: key for key in delta.parameters(whole_modules=True)}


def _check_shared(fmt: Format, att: Attachment, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Tensors PEFT saved once for all modules (VeRA's projections) must be the ones our config rebuilds."""
    for key, ours in fmt.shared(att).items():
        saved = tensors.get(SHARED_PREFIX + key)
        if saved is not None and not (saved.shape == ours.shape and torch.equal(saved, ours.to(saved.dtype))):
            raise CheckpointError(f"{where}: the adapter's {key} differs from the one its config's seed generates "
                                  f"(shape {tuple(saved.shape)} vs {tuple(ours.shape)}); deltatune rebuilds shared "
                                  f"projections from the seed and cannot use other values")


def _to_deltatune_keys(delta: Delta, tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Map PEFT keys onto this delta's keys; keys with no counterpart stay as they are so that
    the key check reports them."""
    att = delta.attachments[0]
    fmt = FORMATS[att.config.method]
    _check_shared(fmt, att, tensors, where)
    shared = {SHARED_PREFIX + key for key in fmt.shared(att)}
    mapping = {f"{PREFIX}{path}.{fmt.names(m)[n]}": f"{att.slot}:{path}.{n}"
               for path, m in att.modules.items() for n in m.saved_state()}
    mapping.update(_whole_module_keys(delta))
    # PEFT also writes the base embedding weight for embedding targets ("...base_layer.weight"): not a delta
    return {mapping.get(k, k): v for k, v in tensors.items() if not k.endswith("base_layer.weight") and k not in shared}
