"""TRL 1.16's SFTTrainer and DPOTrainer on a deltatune model (tiny Llama): what the plain classes do, and the
Delta* classes that save only the delta and take DPO's reference from the base model (delta off)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.core.inject import base_state_dict
from tests.conftest import perturb
from tests.train.test_preference import toy_pairs

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from deltatune.train.trl_trainers import DeltaDPOTrainer, DeltaSFTTrainer  # noqa: E402  (needs trl)

LORA = dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"])


def assert_loads_back(model_dir, saved, delta) -> None:
    """The saved directory holds exactly the trained delta. (Compared by tensors: after ``train()`` the trained
    model's forward runs under the Trainer's autocast wrapper, so its logits are not a float32 reference.)"""
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = dt.load(fresh, saved).state_dict()
    trained = delta.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)


def dpo_args(out, precompute: bool, **more):
    return trl.DPOConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=0.01,
                         report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", max_length=32,
                         precompute_ref_log_probs=precompute, seed=3, **more)


@pytest.fixture
def parts(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return tokenizer, model, datasets.Dataset.from_list(toy_pairs(16, seed=1))


def test_plain_dpo_trainer_loads_a_second_model_without_precompute(parts, tmp_path):
    tokenizer, model, pairs = parts
    dt.attach(model, LORA)
    trainer = trl.DPOTrainer(model=model, args=dpo_args(tmp_path, False), train_dataset=pairs,
                             processing_class=tokenizer)
    assert trainer.ref_model is not None and trainer.ref_model is not model  # a full copy, from config._name_or_path
    with_precompute = trl.DPOTrainer(model=model, args=dpo_args(tmp_path / "p", True), train_dataset=pairs,
                                     processing_class=tokenizer)
    assert with_precompute.ref_model is None  # the reference: the model as it is before training


def test_delta_dpo_trainer_refuses_to_let_trl_copy_the_model(parts, tmp_path):
    tokenizer, model, pairs = parts
    dt.attach(model, LORA)
    with pytest.raises(ConfigError, match="precompute_ref_log_probs=True"):
        DeltaDPOTrainer(model=model, args=dpo_args(tmp_path, False), train_dataset=pairs, processing_class=tokenizer)


def test_delta_dpo_reference_is_the_base_model_and_only_the_delta_trains_and_saves(parts, tiny_llama_dir, tmp_path):
    tokenizer, model, pairs = parts
    delta = dt.attach(model, LORA)
    perturb(delta, std=0.3)  # a delta that already changes the model: the reference must still be the base
    frozen = {k: v.clone() for k, v in base_state_dict(model).items()}
    before = {k: v.detach().clone() for k, v in delta.state_dict().items()}
    trainer = DeltaDPOTrainer(model=model, args=dpo_args(tmp_path / "run", True), train_dataset=pairs,
                              processing_class=tokenizer)
    bare = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base_ref = trl.DPOTrainer(model=bare, args=dpo_args(tmp_path / "bare", True), train_dataset=pairs,
                              processing_class=tokenizer).train_dataset
    ours = trainer.train_dataset
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.allclose(torch.tensor(ours[key]), torch.tensor(base_ref[key]), atol=1e-5)
    trainer.train()
    after = base_state_dict(model)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any(not torch.equal(v, before[k]) for k, v in delta.state_dict().items())
    trainer.save_model(str(tmp_path / "saved"))
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert "delta.safetensors" in files and not {"model.safetensors", "pytorch_model.bin"} & files
    assert_loads_back(tiny_llama_dir, tmp_path / "saved", delta)


def test_delta_sft_trainer_trains_and_saves_only_the_delta(parts, tiny_llama_dir, tmp_path):
    tokenizer, model, pairs = parts
    delta = dt.attach(model, LORA)
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=0.01,
                         report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", max_length=32)
    before = {k: v.detach().clone() for k, v in delta.state_dict().items()}
    trainer = DeltaSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert any(not torch.equal(v, before[k]) for k, v in delta.state_dict().items())
    trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    assert_loads_back(tiny_llama_dir, tmp_path / "saved", delta)
