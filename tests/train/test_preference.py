"""task: dpo on a tiny random Llama with the tiny word-level tokenizer: the losses against their formulas, the
reference pass really being the base model, gradients only on the delta, per-record errors before training,
a short run that learns held-out pairs, and save -> load."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltatune as dt
from deltatune.core.lm_loss import FusedLMLoss
from deltatune.train import distributed, jobs
from deltatune.train.config import load_config
from deltatune.train.data import DataError
from deltatune.train.loop import MetricsLog
from deltatune.train.preference import (
    PreferenceObjective,
    collate_pairs,
    dpo_loss,
    encode_pairs,
    load_pairs,
    sequence_logps,
    simpo_loss,
)
from tests.conftest import perturb
from tests.train.conftest import FILLER, NEGATIVE, POSITIVE

LORA = dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"])


def toy_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """A sentence with one positive or one negative word; the chosen answer names its sentiment."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(FILLER, rng.randint(1, 3))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if i % 2 else NEGATIVE))
        right, wrong = ("good", "bad") if i % 2 else ("bad", "good")
        out.append({"prompt": " ".join(words), "chosen": f"it was {right}", "rejected": f"it was {wrong}"})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


@pytest.fixture
def batch(tokenizer):
    pairs = encode_pairs(toy_pairs(6, seed=3), tokenizer, 32, "toy")
    return pairs, collate_pairs(pairs, [0, 1, 2, 3], tokenizer.pad_token_id)


# -- losses -----------------------------------------------------------------------------------------

def test_dpo_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(5, generator=g) * 3 for _ in range(4))
    loss, chosen_rewards, rejected_rewards = dpo_loss(c, r, rc, rr, beta=0.3)
    by_hand = [-math.log(1 / (1 + math.exp(-0.3 * ((c[i] - rc[i]) - (r[i] - rr[i])).item()))) for i in range(5)]
    assert loss.item() == pytest.approx(sum(by_hand) / 5, rel=1e-6)
    assert torch.allclose(chosen_rewards, 0.3 * (c - rc)) and torch.allclose(rejected_rewards, 0.3 * (r - rr))


def test_simpo_loss_is_the_formula():
    c, r = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -2.0])
    nc, nr = torch.tensor([2, 3]), torch.tensor([3, 1])
    loss, _, _ = simpo_loss(c, r, nc, nr, beta=2.0, gamma=0.5)
    margins = [2.0 * (-4 / 2) - 2.0 * (-6 / 3) - 0.5, 2.0 * (-9 / 3) - 2.0 * (-2 / 1) - 0.5]
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / 2, rel=1e-6)


def test_sequence_logps_sum_the_response_tokens_only(model, batch):
    pairs, b = batch
    sums, counts = sequence_logps(model, b)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    for row in range(len(sums)):
        targets = [(t, int(b["labels"][row, t + 1])) for t in range(b["labels"].shape[1] - 1)
                   if b["labels"][row, t + 1] != -100]
        assert counts[row] == len(targets) > 0
        assert sums[row].item() == pytest.approx(sum(logp[row, t, y].item() for t, y in targets), abs=1e-4)
    fused = FusedLMLoss(model)
    assert torch.allclose(sequence_logps(model, b, fused)[0], sums, atol=1e-5)  # train.fused_loss: same numbers


# -- the reference is the base model ----------------------------------------------------------------

def test_at_attach_the_loss_is_log2_and_reference_equals_policy(model, batch):
    pairs, b = batch
    dt.attach(model, LORA)
    objective = PreferenceObjective(model, "dpo", beta=0.1)
    policy, _ = sequence_logps(model, b)
    assert torch.equal(objective.reference_logps(b), policy)
    loss, chosen, rejected = objective.losses(b)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.equal(chosen, torch.zeros(4)) and torch.equal(rejected, torch.zeros(4))


def test_reference_pass_has_the_delta_off(model, tiny_llama_dir, batch):
    pairs, b = batch
    delta = dt.attach(model, LORA)
    perturb(delta, std=0.5)
    bare = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()  # the same base, no delta at all
    objective = PreferenceObjective(model, "dpo", beta=0.1)
    reference = objective.reference_logps(b)
    assert torch.allclose(reference, sequence_logps(bare, b)[0], atol=1e-6)
    policy = sequence_logps(model, b)[0]
    assert (policy - reference).abs().max() > 1e-2  # the delta does change the policy
    assert delta.is_active and model.training is False  # switched back on afterwards, mode restored


def test_gradients_reach_only_the_delta(model, batch):
    pairs, b = batch
    delta = dt.attach(model, LORA)
    perturb(delta)
    model.train()
    PreferenceObjective(model, "dpo", beta=0.1).loss(b).backward()
    ids = {id(p) for p in delta.parameters().values()}
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all(id(model.get_parameter(n)) in ids for n in with_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters().values())


def test_simpo_runs_no_reference_pass(model, batch, monkeypatch):
    pairs, b = batch
    dt.attach(model, LORA)
    objective = PreferenceObjective(model, "simpo", beta=2.0, gamma=1.0)
    monkeypatch.setattr(objective, "reference_logps", lambda *a: pytest.fail("SimPO called the reference"))
    loss, chosen, rejected = objective.losses(b)
    sums, counts = sequence_logps(model, b)
    n = len(chosen)
    expected = -F.logsigmoid(2.0 * sums[:n] / counts[:n] - 2.0 * sums[n:] / counts[n:] - 1.0).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# -- data errors, before training -------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    ({"prompt": "the film", "chosen": "good"}, r"record 2: missing field\(s\) rejected"),
    ({"prompt": "the film", "chosen": "good", "rejected": "  "}, "record 2: rejected is empty"),
    ({"prompt": "the film", "chosen": "", "rejected": "bad"}, "record 2: chosen is empty"),
    ({"prompt": " ".join(["film"] * 40), "chosen": "good", "rejected": "bad"}, "record 2: the prompt alone is"),
])
def test_bad_records_fail_before_training_naming_file_and_record(tmp_path, tiny_llama_dir, bad, message):
    train = write_jsonl(tmp_path / "prefs.jsonl", [toy_pairs(1, 0)[0], bad, toy_pairs(1, 1)[0]])
    cfg = run_config(tmp_path, tiny_llama_dir, train, None, max_steps=2)
    with pytest.raises(DataError, match=message) as e:
        jobs.train(cfg)
    assert str(train) in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_prompts_use_the_chat_template_when_the_tokenizer_has_one(tokenizer):
    plain = encode_pairs(toy_pairs(1, 0), tokenizer, 32, "toy").rows
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} ### response :{% endfor %}"
    templated = encode_pairs(toy_pairs(1, 0), tokenizer, 32, "toy").rows
    words = tokenizer.convert_ids_to_tokens(templated.input_ids[: templated.offsets[1]].tolist())
    assert "###" in words and "###" not in tokenizer.convert_ids_to_tokens(plain.input_ids.tolist())


# -- a short run: it learns, and the checkpoint reproduces it ---------------------------------------

def run_config(tmp_path: Path, model_dir: Path, train: Path, dev: Path | None, **overrides):
    data = {"task": "dpo", "model": {"path": str(model_dir)}, "output_dir": str(tmp_path / "run"), "seed": 3,
            "data": {"train": str(train), "validation": str(dev) if dev else None, "max_length": 24,
                     "cache_dir": str(tmp_path / "cache")},
            "delta": [{"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}],
            "train": {"batch_size": 8, "learning_rate": 0.01, "warmup_ratio": 0.0, "eval_every": 20,
                      "log_every": 5, "save_every": 100, "progress": "never", "num_threads": 1, **overrides}}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


# held-out reward accuracy after 60 steps (0.875 when written: 0.71 at step 10, 0.83 at 20); chance is 0.5, and a
# tie (step 0: every reward is 0) counts as wrong
ACCURACY_FLOOR = 0.8


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("dpo")
    train = write_jsonl(tmp / "train.jsonl", toy_pairs(96, seed=1))
    dev = write_jsonl(tmp / "dev.jsonl", toy_pairs(48, seed=2))
    cfg = run_config(tmp, tiny_llama_dir, train, dev, max_steps=60, beta=0.5)
    return cfg, jobs.train(cfg)


def test_held_out_preference_accuracy_rises(trained):
    cfg, summary = trained
    evals = [r for r in MetricsLog.read(Path(cfg.output_dir) / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert evals[-1]["eval_reward_accuracy"] >= ACCURACY_FLOOR
    assert evals[0]["eval_loss"] > evals[-1]["eval_loss"]
    assert evals[-1]["eval_loss"] < math.log(2) - 0.1 and evals[-1]["eval_reward_margin"] > 0
    trains = [r for r in MetricsLog.read(Path(cfg.output_dir) / "metrics.jsonl") if r["type"] == "train"]
    assert all("reward_accuracy" in r and "reward_margin" in r for r in trains)
    assert summary["metric"] == "loss" and (Path(cfg.output_dir) / "last" / "delta.safetensors").exists()


def test_saved_delta_loads_and_gives_the_same_metrics(trained, tiny_llama_dir):
    cfg, summary = trained
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    dt.load(fresh, Path(cfg.output_dir) / "last")
    found = PreferenceObjective.from_config(fresh, cfg.train).evaluate(
        load_pairs(cfg, tokenizer, "validation"), tokenizer.pad_token_id, 64, distributed.Dist())
    final = summary["final_eval"]
    for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
        assert found[key] == pytest.approx(final[key], abs=1e-5)
    evaluated = jobs.run_eval(cfg, Path(cfg.output_dir) / "last")  # what `deltatune eval` runs
    assert evaluated["eval_reward_accuracy"] == pytest.approx(final["eval_reward_accuracy"], abs=1e-6)


def test_beta_and_metric_resolve_per_loss(tmp_path, tiny_llama_dir):
    train = write_jsonl(tmp_path / "p.jsonl", toy_pairs(4, 0))
    assert run_config(tmp_path, tiny_llama_dir, train, None).train.beta == 0.1
    simpo = run_config(tmp_path, tiny_llama_dir, train, None, preference_loss="simpo")
    assert (simpo.train.beta, simpo.train.metric) == (2.0, "loss")
    with pytest.raises(Exception, match="reward_accuracy"):
        run_config(tmp_path, tiny_llama_dir, train, None, metric="perplexity")
