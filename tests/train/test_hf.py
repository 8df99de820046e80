"""A delta-attached model trains with the HF Trainer; DeltaTrainer's checkpoints hold only the delta (plus the
train_modules) and resume from them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import deltatune as dt
from deltatune.core.inject import base_state_dict
from deltatune.train.hf import DeltaTrainer


@pytest.fixture(scope="module")
def dataset(tiny_bert_nodrop_dir, sentiment_files):
    tok = AutoTokenizer.from_pretrained(tiny_bert_nodrop_dir)
    rows = [line.split("\t") for line in sentiment_files[0].read_text().splitlines()[1:]]
    return tok, [{**tok(text), "labels": int(label)} for text, label in rows]


def setup(model_dir, tok, data, out, **args):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    delta = dt.attach(model, dt.LoRA(r=4, targets=["query", "value"]), train_modules=["classifier"])
    defaults = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=0.01, num_train_epochs=1,
                    report_to=[], use_cpu=True, disable_tqdm=True, seed=3, logging_steps=4, save_strategy="no")
    trainer_args = TrainingArguments(**{**defaults, **args})
    return model, delta, trainer_args, DataCollatorWithPadding(tok)


def test_the_plain_trainer_trains_only_the_delta(tiny_bert_nodrop_dir, dataset, tmp_path):
    tok, data = dataset
    model, delta, args, collator = setup(tiny_bert_nodrop_dir, tok, data, tmp_path)
    frozen = {k: v.clone() for k, v in base_state_dict(model).items() if not k.startswith("classifier")}
    before = {k: v.detach().clone() for k, v in delta.state_dict().items()}
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    after = base_state_dict(model)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # the base is untouched, bit for bit
    changed = [k for k, v in delta.state_dict().items() if not torch.equal(v, before[k])]
    assert any("lora_B" in k for k in changed) and any(k.startswith("train:classifier") for k in changed)
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == delta.num_trainable()


def test_delta_trainer_checkpoints_hold_only_the_delta_and_resume(tiny_bert_nodrop_dir, dataset, tmp_path):
    tok, data = dataset
    model, delta, args, collator = setup(tiny_bert_nodrop_dir, tok, data, tmp_path / "a", save_strategy="steps",
                                         save_steps=6, max_steps=12)
    DeltaTrainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    checkpoint = tmp_path / "a" / "checkpoint-6"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"delta.safetensors", "delta_config.json", "optimizer.pt", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}
    assert set(load_file(checkpoint / "delta.safetensors")) == set(delta.state_dict())
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    moments = sum(s["exp_avg"].numel() for s in optimizer["state"].values())
    assert moments == delta.num_trainable()  # optimizer state for the delta (and head) only
    final = {k: v.clone() for k, v in delta.state_dict().items()}

    fresh, fresh_delta, args, collator = setup(tiny_bert_nodrop_dir, tok, data, tmp_path / "a", save_strategy="steps",
                                               save_steps=6, max_steps=12)
    DeltaTrainer(model=fresh, args=args, train_dataset=data, data_collator=collator).train(
        resume_from_checkpoint=str(checkpoint))
    resumed = fresh_delta.state_dict()
    assert all(torch.allclose(resumed[k], final[k], atol=1e-6) for k in final)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tiny_bert_nodrop_dir)
    loaded = dt.load(reloaded, tmp_path / "a" / "checkpoint-12")  # a Trainer checkpoint is a dt.load-able delta
    assert all(torch.equal(v, final[k]) for k, v in loaded.state_dict().items())
