"""Probes of the engines deltatune's sharded training does not drive yet: does DeepSpeed ZeRO-3 run a
deltatune LoRA here, and does a bitsandbytes 4-bit base survive FSDP2's ``fully_shard``? Each prints what
happened (or the exact error) per process; docs/distributed.md quotes the results.

    torchrun --standalone --nproc_per_node 2 bench/engine_probes.py deepspeed
    torchrun --standalone --nproc_per_node 2 bench/engine_probes.py qlora-fsdp
"""

from __future__ import annotations

import sys
import traceback

import torch
import torch.distributed as dist
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.train.distributed import Dist
from deltatune.train.sharding import shard_model


def small_llama(seed: int = 0) -> LlamaForCausalLM:
    """Hidden 256: bitsandbytes' CPU 4-bit kernels need rows of at least one 64-value block."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=512))


def deepspeed_zero3(rank: int) -> None:
    import deepspeed

    model = small_llama()
    delta = dt.attach(model, dt.LoRA(r=4))
    params = list(delta.parameters().values())
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3,
              "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2), config=config,
                                      model_parameters=params)
    frozen = model.model.layers[0].self_attn.q_proj.base.weight
    print(f"rank {rank}: frozen q_proj partitioned to {frozen.ds_tensor.numel()} of {frozen.ds_numel} values",
          flush=True)
    torch.manual_seed(rank)
    for step in range(2):
        ids = torch.randint(3, 120, (2, 9))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        print(f"rank {rank}: ZeRO-3 step {step} loss {loss.item():.4f}", flush=True)


def qlora_fsdp(rank: int, world: int, directory: str = "/tmp/deltatune-probe-llama") -> None:
    from transformers import AutoModelForCausalLM

    if rank == 0:
        small_llama().save_pretrained(directory)
    dist.barrier()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization)
    weight = model.model.layers[0].self_attn.q_proj.weight
    print(f"rank {rank}: base weight {type(weight).__name__} {weight.dtype} {tuple(weight.shape)}", flush=True)
    delta = dt.attach(model, dt.LoRA(r=4))
    ids = torch.randint(3, 120, (2, 9))
    model(input_ids=ids)  # the unsharded 4-bit model runs
    shard_model(model, delta, Dist(rank, world, torch.device("cpu"), sharded=True))
    weight = model.model.layers[0].self_attn.q_proj.base.weight
    print(f"rank {rank}: after fully_shard the weight is a {type(weight).__name__}", flush=True)
    try:
        model(input_ids=ids)
        print(f"rank {rank}: sharded 4-bit forward ran", flush=True)
    except Exception:  # the probe's point is to show the error
        print(f"rank {rank}: sharded 4-bit forward failed:\n{traceback.format_exc(limit=-2)}", flush=True)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        deepspeed_zero3(rank) if sys.argv[1] == "deepspeed" else qlora_fsdp(rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
