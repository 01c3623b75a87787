"""More than one process: torchrun's environment, DDP/FSDP wrapping, collectives, launching.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process trains on its shard of
each global batch; gradients are averaged by PyTorch's DDP, or the model is sharded with FSDP
(``fully_shard``: every parameter split across processes, gathered layer by layer for the
forward and backward). Only rank 0 writes files. A process on CPU uses the gloo backend, one on
CUDA uses NCCL and the GPU ``LOCAL_RANK``.

A 4-bit base (``--method qlora``, ``--quantize``) shards too: ``_fully_shard`` says how.

``peftkit train --nproc N`` starts ``torchrun --standalone --nproc_per_node N`` on this machine
(``launch``); on several machines run ``torchrun`` yourself (README: "More than one GPU").
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

import peftkit

from .. import ConfigError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None) -> World:
    """This process's place: a single process, or one of torchrun's (process group started)."""
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if not under_torchrun():
        return World(device=torch.device("cuda" if cuda else "cpu"))
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {rank} wants GPU {local_rank}, but this machine has {torch.cuda.device_count()}; "
                              "start at most one process per GPU (--nproc / --nproc-per-node), or --device cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))  # processes share the cores
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    return World(rank, size, local_rank, dev)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(world: World, values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over every process (float64)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(world: World, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (on every process)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def wrap(model: nn.Module, world: World, fsdp: bool) -> nn.Module:
    """The module the training step calls: ``model`` itself, DDP around it, or FSDP-sharded.

    FSDP shards each of the model's repeated blocks (transformers' ``_no_split_modules``) and
    then the root, so one block's full parameters exist at a time.
    """
    if fsdp:
        if not world.distributed:
            raise ConfigError("--fsdp shards the model across processes; run it with --nproc N (N > 1) or torchrun")
        return _fully_shard(model, world)
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _fully_shard(model: nn.Module, world: World) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    # A 4-bit base (QLoRA, --quantize) is sharded like any other: FSDP2 splits each layer's
    # packed uint8 codes along dim 0 into plain tensors and gathers them back for the block's
    # forward and backward, casting nothing (integer parameters are left out of mixed
    # precision). What does not travel is the Params4bit's quantization state (block scales,
    # their double-quantized scales, the code book: tensors that are not parameters, kept whole
    # on every process, 1/64 byte a weight with double quantization). bitsandbytes' forward
    # rebuilds the gathered weight's state from the layer's `quant_state`, which `quant.settle`
    # keeps there. Settling here also turns the AVX512-BF16 CPU repack off once more and
    # unpacks a layer packed earlier (the rebuild assumes the portable layout), while the
    # weights are still whole.
    peftkit.quant.settle_all(model)
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ConfigError(f"--fsdp: {type(model).__name__} names no repeated blocks (_no_split_modules) to shard")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients across processes on this backward only when ``sync`` (accumulation)."""
    if sync or not dist.is_initialized():
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole: an FSDP shard (DTensor) is gathered from every process (a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def launch(nproc: int, args: list[str]) -> int:
    """Run ``python -m peftkit <args>`` in ``nproc`` processes on this machine with torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "peftkit", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the processes share the cores
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return subprocess.call(cmd, env=env)
