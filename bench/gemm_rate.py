"""How fast this machine multiplies matrices: the ceiling under every train step in BENCHMARKS.md.

A frozen model's training step is mostly its own matrix products (forward, and the input gradients in
backward); no library, compiled or not, makes those cheaper. This prints GFLOP/s for the benchmark models'
main shapes through aten's default path (MKL here) and oneDNN, 2 threads:
    python bench/gemm_rate.py
"""

from __future__ import annotations

import time

import torch

SHAPES = {  # (tokens, in, out) -> where it occurs
    (4096, 384, 1536): "MiniLM FFN up (batch 32 x 128)",
    (1024, 768, 2560): "llama110m gate/up (batch 4 x 256)",
    (1024, 2560, 768): "llama110m down",
    (1024, 768, 32000): "llama110m lm_head",
}


def seconds_per_call(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print("| tokens x in x out | where | default ms | GFLOP/s | oneDNN ms | GFLOP/s |\n|---|---|---|---|---|---|")
    for (tokens, fan_in, fan_out), where in SHAPES.items():
        x, w = torch.randn(tokens, fan_in), torch.randn(fan_out, fan_in)
        x_dnn, w_dnn = x.to_mkldnn(), w.to_mkldnn()
        flops = 2 * tokens * fan_in * fan_out
        default = seconds_per_call(lambda x=x, w=w: x @ w.T)
        dnn = seconds_per_call(lambda x=x_dnn, w=w_dnn: torch._C._nn.mkldnn_linear(x, w, None))
        print(f"| {tokens} x {fan_in} x {fan_out} | {where} | {1e3 * default:.1f} | {flops / default / 1e9:.0f} | "
              f"{1e3 * dnn:.1f} | {flops / dnn / 1e9:.0f} |")


if __name__ == "__main__":
    main()
