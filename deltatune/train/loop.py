"""The training loop: plain PyTorch, one optimizer step per ``_step`` call, everything else a call.

Per step: forward/backward over ``grad_accum`` micro-batches (autocast in bf16/fp16 where asked), average
gradients and loss over processes, stop on a non-finite loss BEFORE the update (so the weights and the last
checkpoint stay good), clip, step AdamW (separate learning rates for the delta and for ``train_modules``
such as a new head), step the warm-up + linear/cosine schedule. After the step: log, evaluate when due
(keeping the best delta), write the training state when due. Batches are a pure function of (seed, epoch),
and the state holds RNG states and the data position, so a resumed run is the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.delta import Delta
from ..core.errors import ConfigError, DeltaError
from ..core.lm_loss import FusedLMLoss
from ..methods.lora import LoRAEmbedding, LoRALinear
from . import distributed, sharding
from .batches import IGNORE, Encoded, collate, eval_batches, train_batches
from .config import RunConfig, TrainConfig
from .metrics import classification_metrics, is_better, perplexity
from .packing import check_packing, collate_packed
from .preference import PreferenceObjective
from .quantization import adamw_8bit
from .samples import complete, sample_prompts
from .state import Progress, load_state, rng_state, save_state, set_rng_state
from .threads import ThreadGovernor
from .trackers import Trackers

log = logging.getLogger(__name__)


class TrainingDivergedError(DeltaError, FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; training stopped before the bad update."""


@dataclasses.dataclass
class Session:
    """What one training run works on (built by ``jobs.train``)."""

    cfg: RunConfig
    model: nn.Module
    delta: Delta
    train_set: Encoded
    eval_set: Encoded | None
    pad_id: int
    run_dir: Path
    dist: distributed.Dist
    threads: ThreadGovernor | None = None  # re-decides the CPU thread count between steps
    objective: PreferenceObjective | None = None  # task dpo: its own batches, loss and evaluation
    tokenizer: Any = None  # language models: for the generation samples at each evaluation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(delta: Delta, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW (or bitsandbytes' 8-bit AdamW with ``train.optimizer: adamw8bit``) with one group for the delta and
    one for ``train_modules`` (its own learning rate); with ``loraplus_ratio`` != 1 LoRA's B matrices get a third
    group at that multiple of the delta's rate (LoRA+)."""
    ratio = t.loraplus_ratio or 1.0
    fast = loraplus_parameters(delta) if ratio != 1.0 else set()
    own = list(delta.parameters(whole_modules=False).values())
    groups = {"delta": [p for p in own if id(p) not in fast],
              "head": list(delta.parameters(whole_modules=True).values()),
              "lora_B": [p for p in own if id(p) in fast]}
    lrs = {"delta": t.learning_rate, "head": t.head_learning_rate or t.learning_rate,
           "lora_B": t.learning_rate * ratio}
    param_groups = [{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items() if ps]
    if t.optimizer == "adamw8bit":
        return adamw_8bit(param_groups, t.learning_rate, t.weight_decay)
    return torch.optim.AdamW(param_groups, lr=t.learning_rate, weight_decay=t.weight_decay)


def loraplus_parameters(delta: Delta) -> set[int]:
    """ids of the LoRA B matrices of ``delta`` (LoRA+ trains them faster), or a ConfigError when it has none."""
    found = {id(w.lora_B) for w in delta.wrappers() if isinstance(w, (LoRALinear, LoRAEmbedding))}
    if not found:
        raise ConfigError(f"train.loraplus_ratio gives LoRA's B matrices a higher learning rate, but this delta has "
                          f"no LoRA ({[c.method for c in delta.configs]}); remove loraplus_ratio or set it to 1")
    return found


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step`` (HF's definitions: linear warm-up from 0, then decay)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    done = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - done) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device`` (None: plain fp32)."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision fp16 needs a CUDA GPU (device is {device}); use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def compiled_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` with dynamic shapes (length-grouped batches vary in length: no recompile per length).
    On CPU, dropout masks come from aten's generator (inductor's ``fallback_random``): inductor's own CPU
    random kernels made the attention-dropout kernel ~3x slower than eager's (BENCHMARKS.md, "Compiled")."""
    return torch.compile(model, dynamic=True, options={"fallback_random": device.type == "cpu"})


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, pad_id: int, batch_size: int, info: distributed.Dist,
             dtype: torch.dtype | None = None, forward_kwargs: dict[str, Any] | None = None,
             lm_loss: FusedLMLoss | None = None) -> dict[str, float]:
    """``eval_*`` metrics of ``model`` on ``data``; every process evaluates a share, results are gathered.
    ``lm_loss``: a language model's loss without the full logits (``train.fused_loss``)."""
    was_training = model.training
    model.eval()
    loss_sum, count, preds, labels = torch.zeros((), device=info.device), 0, [], []
    autocast = torch.autocast(info.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    batches = eval_batches(data.lengths(), batch_size, info.world, info.rank)
    for indices in batches:
        batch = {k: v.to(info.device) for k, v in collate(data, indices, pad_id).items()}
        with autocast:
            if lm_loss is not None and data.per_token_labels:
                out, loss = None, lm_loss.uncompiled(batch)
            else:
                out = model(**batch, **(forward_kwargs or {}))
                loss = out.loss
        n = int((batch["labels"][:, 1:] != IGNORE).sum()) if data.per_token_labels else len(indices)
        loss_sum += loss.float() * n
        count += n
        if not data.per_token_labels:
            preds.append(out.logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
    for indices in sharding.idle_batches(info, data.lengths(), batch_size, len(batches)):
        with autocast:  # results unused: a sharded forward needs every process to take part
            model(**{k: v.to(info.device) for k, v in collate(data, indices, pad_id).items()}, **(forward_kwargs or {}))
    model.train(was_training)
    parts = distributed.gather(info, (loss_sum.item(), count, torch.cat(preds) if preds else None,
                                      torch.cat(labels) if labels else None))
    mean_loss = sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts))
    if data.per_token_labels:
        return {"eval_loss": mean_loss, "eval_perplexity": perplexity(mean_loss)}
    all_preds = torch.cat([p[2] for p in parts if p[2] is not None])
    all_labels = torch.cat([p[3] for p in parts if p[3] is not None])
    if info.is_main:
        warn_if_collapsed(all_preds, all_labels, data.label_names)
    found = classification_metrics(all_preds, all_labels, len(data.label_names))
    return {"eval_loss": mean_loss, **{f"eval_{k}": v for k, v in found.items()}}


def warn_if_collapsed(preds: torch.Tensor, labels: torch.Tensor, label_names: list[str]) -> None:
    """Warn when every prediction is one class though the labels hold several.

    A learning rate too high for a method rarely diverges on a classifier: the loss stays finite while
    the model settles on the majority class, so the NaN guard never fires and the run just looks weak.
    """
    if len(preds) < 2 or labels.unique().numel() < 2 or preds.unique().numel() > 1:
        return
    label = int(preds[0])
    name = label_names[label] if label < len(label_names) else str(label)
    share = (labels == label).double().mean().item()
    log.warning("all %d evaluation predictions are class %r (%.0f%% of the labels): the model answers a "
                "constant. If later evaluations say the same, lower train.learning_rate and "
                "train.head_learning_rate (or train longer); see docs/choosing.md", len(preds), name, 100 * share)


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, appended as training goes (rank 0 only), and mirrored
    to the trackers of ``train.report_to``."""

    def __init__(self, path: Path, keep_until: int | None, trackers: Trackers | None = None) -> None:
        self.path, self.trackers = path, trackers
        kept = [r for r in self.read(path) if keep_until is not None and r.get("step", 0) <= keep_until]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)  # a resumed run drops what the killed one logged after its last state

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by kill -9
                records.append(json.loads(line))
        return records

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)


class Loop:
    """Trains ``session.delta`` as ``session.cfg.train`` says; ``run`` returns the final Progress."""

    def __init__(self, session: Session) -> None:
        self.s, self.t = session, session.cfg.train
        self.model, self.dist = session.model, session.dist
        # the compiled module shares parameters with the model: saving and evaluation use the model itself
        compile_model = self.t.compile and not self.t.fused_loss  # fused: the base model is compiled instead
        self.forward = compiled_for_training(self.model, self.dist.device) if compile_model else self.model
        self.params = list(session.delta.parameters().values())
        self.lengths = session.train_set.lengths()
        self.optimizer = build_optimizer(session.delta, self.t)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self.batches_per_epoch = len(self._batches(0))
        if self.batches_per_epoch == 0:
            raise ConfigError(f"the training set ({len(session.train_set)} examples) is smaller than one batch "
                              f"per process; lower train.batch_size or use fewer processes")
        steps_per_epoch = math.ceil(self.batches_per_epoch / self.t.grad_accum)
        self.total = self.t.max_steps or self.t.epochs * steps_per_epoch
        warmup = self.t.warmup_steps if self.t.warmup_steps is not None else round(self.t.warmup_ratio * self.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total, warmup, self.t.schedule))
        self.dtype = autocast_dtype(self.t.precision, self.dist.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.forward_kwargs = {} if session.cfg.task == "classification" else {"use_cache": False}
        self.progress = Progress()
        self.saved_step: int | None = None
        self.window = {"loss": 0.0, "steps": 0, "examples": 0, "tokens": 0, "seconds": 0.0}
        self.metrics: MetricsLog | None = None
        self.trackers = Trackers([])  # rank 0's are made in ``start``
        self.packing = session.cfg.data.packing
        self.lm_loss = self._fused_lm_loss() if self.t.fused_loss else None
        if self.packing:
            check_packing(self.model, session.train_set, self._batches(0)[0], session.pad_id)

    # -- set-up ----------------------------------------------------------------------------------------
    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, train_batches(self.lengths, self.t.batch_size, self.s.cfg.seed, epoch,
                                                      self.s.cfg.data.group_by_length, self.dist.world,
                                                      self.dist.rank))
        return self._epoch_cache[1]

    def start(self, resume: bool) -> None:
        """Fresh: seed this process' RNGs. Resume: restore weights, optimizer, schedule, RNGs and position."""
        state_dir = self.s.run_dir / "state"
        if resume:
            loaded = load_state(state_dir, self.optimizer)
            if len(loaded.rng) != self.dist.world:
                raise ConfigError(f"{state_dir} was written by {len(loaded.rng)} process(es); resume it with the "
                                  f"same number of processes (now {self.dist.world})")
            self.s.delta.load_state_dict(loaded.delta, state_dir)
            self.optimizer.load_state_dict(loaded.optimizer)
            self.scheduler.load_state_dict(loaded.scheduler)
            if self.scaler is not None and loaded.scaler:
                self.scaler.load_state_dict(loaded.scaler)
            set_rng_state(loaded.rng[self.dist.rank])
            self.progress, self.saved_step = loaded.progress, loaded.progress.step
            log.info("resumed %s at step %d/%d (epoch %d)", self.s.run_dir, self.progress.step, self.total,
                     self.progress.epoch + 1)
        else:
            seed_everything(self.s.cfg.seed + self.dist.rank)
            distributed.broadcast_parameters(self.dist, self.params)
        if self.dist.is_main:
            self.trackers = Trackers(self.t.report_to, self.t.tracker_project)
            self.trackers.start(self.s.run_dir, self.s.cfg.run_name or self.s.run_dir.name, self.s.cfg.to_dict(),
                                self.progress.step if resume else None)
            self.metrics = MetricsLog(self.s.run_dir / "metrics.jsonl", self.progress.step if resume else None,
                                      self.trackers)

    def _fused_lm_loss(self) -> FusedLMLoss:
        """``train.fused_loss``: the loss from the base model's hidden states (compiled when ``train.compile``),
        compared once with the model's own loss on the first training batch before it is trusted."""
        trunk = compiled_for_training(self.model.base_model, self.dist.device) if self.t.compile else None
        try:
            fused = FusedLMLoss(self.model, trunk)
            fused.check(self._device_batch(self.s.train_set, self._batches(0)[0]))
        except DeltaError as e:
            raise ConfigError(f"train.fused_loss: {e}") from None
        return fused

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> Progress:
        p = self.progress
        began = time.perf_counter() - p.elapsed_s
        self.model.train()
        with self._bar() as bar:
            while p.step < self.total:
                batches = self._batches(p.epoch)
                group = batches[p.batch:p.batch + self.t.grad_accum]
                tick = time.perf_counter()
                loss = self._step(group)
                p.step, p.batch = p.step + 1, p.batch + len(group)
                epoch_end = p.batch >= len(batches)
                if epoch_end:
                    p.epoch, p.batch = p.epoch + 1, 0
                p.elapsed_s = time.perf_counter() - began
                self._account(loss, group, time.perf_counter() - tick, bar)
                self._after_step(epoch_end, last=p.step == self.total)
                if self.s.threads is not None:
                    self.s.threads.tick()
        distributed.check_agreement(self.dist, self.params)
        if self.dist.world > 1:
            log.info("all %d processes hold identical trained weights", self.dist.world)
        return p

    def _step(self, group: list[list[int]]) -> float:
        """One optimizer step over the micro-batches in ``group``; raises before updating on a NaN/inf loss."""
        loss_sum = torch.zeros((), device=self.dist.device)
        for indices in group:
            batch = self._device_batch(self.s.train_set, indices)
            with self._autocast():
                if self.s.objective is not None:
                    loss = self.s.objective.loss(batch, self.forward, self.lm_loss) / len(group)
                elif self.lm_loss is not None:
                    loss = self.lm_loss(batch) / len(group)
                else:
                    loss = self.forward(**batch, **self.forward_kwargs).loss / len(group)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += loss.detach().float()
        loss = distributed.average_gradients(self.dist, self.params, loss_sum).item()
        if not math.isfinite(loss):
            self._diverged("loss", loss)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.t.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.t.max_grad_norm)
            if self.scaler is None and not torch.isfinite(norm):
                self._diverged("gradient norm", norm.item())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _after_step(self, epoch_end: bool, last: bool) -> None:
        step, every = self.progress.step, self.t.eval_every
        if self.s.eval_set is not None and every != "never" and self.progress.last_eval_step != step and (
                last or (epoch_end if every == "epoch" else step % every == 0)):
            self.evaluate_and_keep_best()
        if last or epoch_end or (self.t.save_every is not None and step % self.t.save_every == 0):
            self.progress.finished = last
            self.checkpoint()

    # -- evaluation ------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if self.s.objective is not None:
            return self.s.objective.evaluate(self.s.eval_set, self.s.pad_id, self.t.eval_batch_size, self.dist,
                                             self.dtype, self.lm_loss)
        return evaluate(self.model, self.s.eval_set, self.s.pad_id, self.t.eval_batch_size, self.dist, self.dtype,
                        self.forward_kwargs, self.lm_loss)

    def evaluate_and_keep_best(self) -> dict[str, float]:
        p = self.progress
        found = self.evaluate()
        p.last_eval_step = p.step
        metric = self.t.metric
        value = found[f"eval_{metric}"]
        if is_better(metric, value, p.best_metric):
            p.best_metric, p.best_step = value, p.step
            if self.dist.is_main:
                self.s.delta.save(self.s.run_dir / "best")
        record = {"type": "eval", "step": p.step, "epoch": self._epoch_float(), **found}
        if self.metrics is not None:
            self.metrics.write(record)
        shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in found.items())
        log.info("step %d/%d eval: %s%s", p.step, self.total, shown, " (best)" if p.best_step == p.step else "")
        self.write_samples()
        return found

    def write_samples(self) -> None:
        """Language models: a ``samples`` record with greedy completions of ``train.sample_prompts`` (main process;
        skipped when the base is sharded, where generating would need every process in step)."""
        prompts = sample_prompts(self.s.cfg.task, self.t.sample_prompts)
        if not prompts or self.s.tokenizer is None or self.metrics is None or self.dist.sharded:
            return
        with self._autocast():
            samples = complete(self.model, self.s.tokenizer, self.s.cfg.task, prompts, self.t.sample_max_new_tokens,
                               self.dist.device)
        self.metrics.write({"type": "samples", "step": self.progress.step, "samples": samples})

    # -- checkpoints -----------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write the last delta and the training state (atomic; every process contributes its RNG state)."""
        states = distributed.gather(self.dist, rng_state())
        if self.dist.is_main:
            self.s.delta.save(self.s.run_dir / "last")
            save_state(self.s.run_dir / "state", self.s.delta, self.optimizer, self.scheduler, self.scaler,
                       self.progress, states)
        self.saved_step = self.progress.step
        distributed.barrier(self.dist)

    def _diverged(self, what: str, value: float) -> None:
        p = self.progress
        kept = (f"the last good checkpoint is {self.s.run_dir / 'last'} with the training state at step "
                f"{self.saved_step}" if self.saved_step is not None else "no checkpoint had been written yet")
        message = (f"{what} is {value} at step {p.step + 1} (epoch {p.epoch + 1}); training stopped before this "
                   f"update, and {kept}. Lower train.learning_rate (now {self.t.learning_rate}), keep "
                   f"train.max_grad_norm set, or use train.precision fp32, then start the run again.")
        if self.metrics is not None:
            self.metrics.write({"type": "error", "step": p.step + 1, "message": message})
        self.optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(message)

    # -- helpers ---------------------------------------------------------------------------------------
    def _device_batch(self, data: Encoded, indices: list[int]) -> dict[str, torch.Tensor]:
        if self.s.objective is not None:
            batch = self.s.objective.collate(data, indices, self.s.pad_id)
        elif self.packing:
            batch = collate_packed(data, indices, self.s.pad_id, self.s.cfg.data.max_length)
        else:
            batch = collate(data, indices, self.s.pad_id)
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def _epoch_float(self) -> float:
        return round(self.progress.epoch + self.progress.batch / self.batches_per_epoch, 4)

    def _show_bar(self) -> bool:
        if self.t.progress != "auto":
            return self.t.progress == "always" and self.dist.is_main
        return self.dist.is_main and sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")

    def _bar(self):
        return tqdm(total=self.total, initial=self.progress.step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not self._show_bar(), file=sys.stderr)

    def _account(self, loss: float, group: list[list[int]], seconds: float, bar) -> None:
        """Throughput window and progress bar; a ``train`` record every ``log_every`` steps."""
        w, p = self.window, self.progress
        w["loss"] += loss
        w["steps"] += 1
        w["examples"] += sum(len(b) for b in group) * self.dist.world  # approximately global (equal shares)
        w["tokens"] += sum(self.lengths[i] for b in group for i in b) * self.dist.world
        w["seconds"] += seconds
        lr = self.scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if p.step % self.t.log_every and p.step != self.total:
            return
        record = {"type": "train", "step": p.step, "epoch": self._epoch_float(), "loss": w["loss"] / w["steps"],
                  "lr": lr, "examples_per_s": w["examples"] / w["seconds"], "tokens_per_s": w["tokens"] / w["seconds"],
                  "elapsed_s": round(p.elapsed_s, 2)}
        rates = {g["name"]: rate for g, rate in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(),
                                                     strict=True)}
        record.update({f"{name}_lr": rates[name] for name in ("head", "lora_B") if name in rates})
        if self.s.objective is not None:
            record.update(self.s.objective.train_metrics())
        if self.metrics is not None:
            self.metrics.write(record)
        if bar.disable and (p.step % max(1, self.total // 10) < self.t.log_every or p.step == self.total):
            log.info("step %d/%d loss %.4f lr %.2e %.1f examples/s", p.step, self.total, record["loss"], lr,
                     record["examples_per_s"])
        self.window = {"loss": 0.0, "steps": 0, "examples": 0, "tokens": 0, "seconds": 0.0}
