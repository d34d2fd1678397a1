"""Fully sharded data parallel (torch FSDP2) for the large sizes (2B, 5B): parameters, gradients and
optimizer state sharded over the processes, one shard group per transformer block and per ResNet block,
activation checkpointing, bf16 parameters with fp32 gradient reduction.

accelerate 1.x applies FSDP only on accelerators, so ldmscale shards with torch.distributed.fsdp.fully_shard
itself inside the process group accelerate made; the same code runs on N GPUs (nccl) and, for the tests,
on 2 CPU processes (gloo). Checkpoints stay full, unsharded safetensors: a run trained with FSDP loads,
samples and resumes like any other (on any number of processes).
"""

from __future__ import annotations

import torch

# torch.distributed's FSDP and checkpoint modules are imported where a run shards: at the top of this module they
# cost every training process 1.7 s of start-up (measured: `import ldmscale.train.loop` 5.0 s -> 3.3 s)


def shard(unet, mixed_precision: str, checkpointing: bool = True):
    """Shard the UNet in place over all processes of the default group; returns it."""
    import torch.distributed as dist
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    for m in unet.modules():  # the wrap policy: each transformer block and each ResNet block is a unit
        if isinstance(m, (BasicTransformerBlock, ResnetBlock2D)):
            fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(unet, mesh=mesh, mp_policy=mp)
    return unet


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor cut into this process's shard of `param`."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
    return full


def model_state(unet) -> dict:
    """Full state dict (all processes call; tensors on CPU)."""
    return {k: full_tensor(v).detach().cpu() for k, v in unet.state_dict().items()}


def optimizer_state(unet, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unet, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(unet, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        unet, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    )
