"""One process of tests/test_distributed_qlora.py's FSDP check (run under torchrun, gloo, CPU).

For every weight-side method over a 4-bit NF4 base (double quantization): the model sharded
with FSDP2 the way ``peftkit train --fsdp`` shards it (``distributed.wrap``) against the same
model unsharded, built from the same seeds. Checked, exactly (no tolerance: the gathered codes
and their state are the same numbers, so the same kernels compute the same outputs):

- inside the sharded forward, every 4-bit layer sees its whole packed uint8 codes, equal to the
  unsharded layer's, and its quantization state (block scales, double-quantized scales) rebuilt
  from the layer: the very state the unsharded layer holds;
- outside the forward, each process holds only its shard of the codes;
- training-mode outputs and every adapter gradient (gathered), eval-mode outputs under
  ``no_grad``; ``weight_bytes`` of the sharded model is the whole model's;
- the layers are created believing the CPU has AVX512-BF16 (as bitsandbytes does on such a
  CPU, whatever this one has), and none is ever repacked for that kernel;
- with an FSDP2 mixed-precision policy casting parameters to bfloat16, the gathered codes are
  still uint8 and unchanged (integer parameters are not cast).

Writes ``<out>/rank<N>.json``: ``{"methods": [...], "checked_layers": N}``; any failed check
raises (non-zero exit).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bitsandbytes.nn.modules as bnb_modules  # noqa: E402

bnb_modules.has_avx512bf16 = lambda: True  # new Linear4bit layers start with the repack switch on

import peftkit  # noqa: E402
from peftkit import quant  # noqa: E402
from peftkit.train import distributed  # noqa: E402
from peftkit.train.methods import build_config  # noqa: E402
from peftkit.train.options import CLI_METHODS, TrainOptions  # noqa: E402

from conftest import tiny_llama  # noqa: E402

torch.set_num_threads(1)


def build(method: str) -> torch.nn.Module:
    """A tiny Llama, quantized, with ``method``'s adapter on it (trainable tensors perturbed, so
    no adapter is the identity and every gradient is non-zero)."""
    model = tiny_llama()
    peftkit.quantize(model)
    targets = "all-linear" if "r" in CLI_METHODS[method][1].options else None
    config = build_config(TrainOptions(method=method, dropout=0.0, targets=targets), "CAUSAL_LM")
    torch.manual_seed(1)
    peftkit.apply(model, config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def four_bit(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb_modules.Linear4bit)}


def watch_gathered(sharded: torch.nn.Module, reference: torch.nn.Module, seen: list[str]) -> list:
    """Hooks checking, at each 4-bit layer's forward, the gathered codes and the rebuilt state."""
    ref = four_bit(reference)
    handles = []
    for name, layer in four_bit(sharded).items():
        expected = ref[name].weight

        def before(module, args, name=name, expected=expected):
            w = module._parameters["weight"]
            assert not module.support_avx512bf16_for_cpu, f"{name}: the AVX512-BF16 repack is on"
            assert not hasattr(w, "full_tensor"), f"{name}: still a shard in its forward"
            assert w.dtype == torch.uint8 and torch.equal(w.detach().view(-1), expected.detach().view(-1)), name

        def after(module, args, out, name=name, expected=expected):
            state, want = module.weight.quant_state, expected.quant_state
            assert state is module.quant_state, f"{name}: state not rebuilt from the layer"
            assert not getattr(state, "packing_format_for_cpu", False), f"{name}: repacked for AVX512-BF16"
            assert torch.equal(state.absmax, want.absmax) and torch.equal(state.code, want.code), name
            if want.nested:
                assert torch.equal(state.state2.absmax, want.state2.absmax) and state.offset == want.offset, name
            seen.append(name)

        handles += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    return handles


def check_method(method: str, world: distributed.World, ids: torch.Tensor) -> int:
    reference, sharded = build(method), build(method)
    expected_bytes = quant.weight_bytes(reference)
    distributed.wrap(sharded, world, fsdp=True)
    for name, layer in four_bit(sharded).items():
        assert not layer.support_avx512bf16_for_cpu, name
        w = layer._parameters["weight"]
        whole = four_bit(reference)[name].weight.numel()  # packed codes: (numel, 1), split along dim 0
        per = -(-whole // world.size)
        mine = min(per, max(0, whole - world.rank * per))
        assert hasattr(w, "full_tensor") and w.to_local().numel() == mine, (name, w.to_local().numel(), whole)
    assert quant.weight_bytes(sharded) == expected_bytes, method
    seen: list[str] = []
    handles = watch_gathered(sharded, reference, seen)
    reference.train(), sharded.train()
    a, b = reference(input_ids=ids).logits, sharded(input_ids=ids).logits
    assert torch.equal(a, b), (method, (a - b).abs().max().item())
    a.square().mean().backward(), b.square().mean().backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for n, p in sharded.named_parameters():
        if p.requires_grad:
            assert grads[n] is not None and p.grad is not None, (method, n)
            assert torch.equal(grads[n], distributed.full_tensor(p.grad)), (method, n)
    reference.eval(), sharded.eval()
    with torch.no_grad():
        a, b = reference(input_ids=ids).logits, sharded(input_ids=ids).logits
    assert torch.equal(a, b), (method, "eval", (a - b).abs().max().item())
    for handle in handles:
        handle.remove()
    layers = len(four_bit(sharded))
    assert len(seen) == 2 * layers, (method, len(seen), layers)  # the training and the eval forward
    return len(seen)


def check_mixed_precision_policy(world: distributed.World, ids: torch.Tensor) -> None:
    """FSDP2 with ``param_dtype=bfloat16``: the adapter is cast, the 4-bit codes are not."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    reference, sharded = build("qlora"), build("qlora")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for block in sharded.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(sharded, mp_policy=policy)
    seen: list[str] = []
    handles = watch_gathered(sharded, reference, seen)
    sharded.train()
    sharded(input_ids=ids)
    assert len(seen) == len(four_bit(sharded))
    for handle in handles:
        handle.remove()


def main() -> None:
    out = Path(sys.argv[1])
    methods = sys.argv[2].split(",")
    dist.init_process_group("gloo")
    world = distributed.World(dist.get_rank(), dist.get_world_size())
    ids = torch.randint(1, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    checked = sum(check_method(m, world, ids) for m in methods)
    check_mixed_precision_policy(world, ids)
    (out / f"rank{world.rank}.json").write_text(json.dumps({"methods": methods, "checked_layers": checked}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
