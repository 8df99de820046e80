"""Fixtures for the reliability tests: a tiny saved model + tokenizer and data for CLI runs (built with the
helpers of tests/train/conftest.py), a YAML-config factory, and a real tmpfs for full/read-only disks."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_bert
from tests.train.conftest import base_overrides, make_tokenizer, write_tsv


@pytest.fixture(scope="session")
def cli_model(tmp_path_factory) -> Path:
    """A saved 2-layer random BERT with its tokenizer; dropout on (0.1), so runs compared bit for bit also
    depend on every RNG being seeded and, on resume, restored."""
    directory = tmp_path_factory.mktemp("rel_model")
    make_tokenizer(directory)
    tiny_bert(num_labels=2).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def cli_data(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("rel_data")
    return write_tsv(directory / "train.tsv", 40, seed=1), write_tsv(directory / "dev.tsv", 16, seed=2)


def _set(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


def write_config(directory: Path, model: Path, data: tuple[Path, Path], name: str = "run", **changes) -> Path:
    """A YAML file for a tiny run with output in directory/<name>; ``changes`` use ``__`` for dots
    (``train__max_steps=4``)."""
    train, dev = data
    config = base_overrides(model, train, dev, directory / name, directory / "cache")
    config["train"].update(epochs=1, save_every=2, log_every=1)
    for dotted, value in changes.items():
        _set(config, dotted.replace("__", "."), value)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def make_config(tmp_path, cli_model, cli_data) -> Callable[..., Path]:
    """make_config(name="run", **changes) -> a YAML config for a tiny run in tmp_path (see write_config)."""
    return lambda name="run", **changes: write_config(tmp_path, cli_model, cli_data, name, **changes)


@pytest.fixture
def mount(tmp_path) -> Callable[[str], Path]:
    """mount(options) -> a fresh tmpfs directory with those options (e.g. "ro,size=64k"); unmounted after.
    Needs root with CAP_SYS_ADMIN; the test is skipped elsewhere."""
    mounted: list[Path] = []

    def make(options: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()[:100]}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)
