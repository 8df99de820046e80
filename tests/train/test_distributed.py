"""Two-process data parallelism (torchrun, gloo on CPU): both processes end with identical weights, and the
result matches one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from deltatune.train import jobs
from deltatune.train.config import load_config
from deltatune.train.loop import MetricsLog
from tests.train.conftest import base_overrides

REPO = Path(__file__).resolve().parents[2]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_bert_nodrop_dir, sentiment_files):
    cfg = base_overrides(tiny_bert_nodrop_dir, *sentiment_files, tmp_path / "single", tmp_path / "cache")
    cfg["train"].update(max_steps=10, batch_size=8, eval_every=5)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    jobs.train(load_config(path))

    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "deltatune.cli", "train", str(path),
           "--output_dir", str(tmp_path / "ddp"), "--train.batch_size", "4"]  # 2 x 4 = the single run's 8
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all 2 processes hold identical trained weights" in result.stderr  # checked bit for bit in the loop

    one, two = (load_file(tmp_path / run / "last" / "delta.safetensors") for run in ("single", "ddp"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    evals = [[r for r in MetricsLog.read(tmp_path / run / "metrics.jsonl") if r["type"] == "eval"]
             for run in ("single", "ddp")]
    assert [r["step"] for r in evals[1]] == [5, 10]
    for a, b in zip(*evals, strict=True):  # the eval set is split across the processes, then gathered
        assert a["eval_accuracy"] == b["eval_accuracy"] and abs(a["eval_loss"] - b["eval_loss"]) < 1e-5
