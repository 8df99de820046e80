"""What ``deltatune serve`` loads from disk (a saved base + NAME=DIR deltas) and the batcher's rules."""

from __future__ import annotations

import asyncio

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.serve import Batcher, Engine, Row, load_engine, parse_deltas
from deltatune.serve.engine import Sampling
from tests.conftest import tiny_llama
from tests.serve.conftest import DELTAS, char_tokenizer, with_three_deltas


def test_load_engine_holds_the_base_once_with_every_named_delta(tmp_path):
    model = with_three_deltas(tiny_llama())
    tokenizer = char_tokenizer()
    for name in DELTAS:
        dt.deltas(model)[name].save(tmp_path / name)
    dt.detach(model)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    reference = with_three_deltas(tiny_llama())

    engine, _ = load_engine(str(tmp_path / "base"), {n: str(tmp_path / n) for n in DELTAS})

    assert engine.task == "causal_lm" and engine.names == sorted(DELTAS)
    rows = [Row("cola", [1, 5, 6, 7], 6), Row(None, [1, 9], 6), Row("sst2", [1, 20, 21], 6),
            Row("cola", [1, 30], 6), Row(None, [1, 11, 12], 6)]  # run grouped by delta, answered in this order
    got = engine.run("generate", Sampling(), rows)
    for row, out in zip(rows, got, strict=True):
        with torch.no_grad(), dt.active(reference, row.delta):
            solo = reference.generate(input_ids=torch.tensor([row.ids]), max_new_tokens=6, do_sample=False,
                                      pad_token_id=0)[0, len(row.ids):].tolist()
        assert out.ids == (solo[:solo.index(2)] if 2 in solo else solo)


@pytest.mark.parametrize("specs, problem", [(["sst2"], "NAME=DIR"), (["=dir"], "NAME=DIR"),
                                            (["a=x", "a=y"], "twice")])
def test_malformed_delta_options_are_refused(specs, problem):
    with pytest.raises(dt.ConfigError, match=problem):
        parse_deltas(specs)


def test_a_delta_named_base_is_refused():
    model = tiny_llama()
    dt.attach(model, dt.LoRA(r=2), name="base")
    with pytest.raises(dt.ConfigError, match="'base'"):
        Engine(model, "causal_lm", pad_id=0)


def run_batches(batcher: Batcher, jobs: list[tuple[str, int]]) -> list:
    async def main():
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(key, [row]) for key, row in jobs), return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_rows_with_the_same_key_share_a_batch_and_others_wait_their_turn():
    seen: list[tuple[str, list[int]]] = []
    batcher = Batcher(lambda key, rows: seen.append((key, rows)) or [r * 10 for r in rows], max_batch_size=3,
                      max_wait_ms=50)
    got = run_batches(batcher, [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("a", 5)])
    assert got == [[10], [20], [30], [40], [50]]
    assert seen == [("a", [1, 3, 4]), ("b", [2]), ("a", [5])]


def test_batching_off_runs_one_row_at_a_time():
    sizes: list[int] = []
    batcher = Batcher(lambda key, rows: sizes.append(len(rows)) or rows, max_batch_size=1, max_wait_ms=50)
    run_batches(batcher, [("a", i) for i in range(4)])
    assert sizes == [1, 1, 1, 1]


def test_a_failing_batch_fails_only_its_own_requests():
    def run(key, rows):
        if key == "bad":
            raise RuntimeError("boom")
        return rows

    got = run_batches(Batcher(run, max_batch_size=4, max_wait_ms=20), [("bad", 1), ("ok", 2), ("ok", 3)])
    assert isinstance(got[0], RuntimeError) and got[1:] == [[2], [3]]


def test_the_cli_refuses_a_malformed_delta_option_before_loading_anything():
    result = CliRunner().invoke(app, ["serve", "some/base", "--delta", "sst2"])
    assert result.exit_code == 2
    assert "NAME=DIR" in result.output
