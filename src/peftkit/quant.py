"""4-bit bases for QLoRA — "QLoRA: Efficient Finetuning of Quantized LLMs" (Dettmers et al., 2023).

The frozen base is stored in 4-bit NormalFloat (NF4) with double-quantized block scales by
bitsandbytes' ``Linear4bit`` (which runs on the CPU as well as on CUDA); computation runs in a
16/32-bit ``compute_dtype``; LoRA units on top are ordinary units (``Linear4bit`` is an
``nn.Linear``), so ``apply`` / ``save`` / ``load`` need nothing special.

bitsandbytes repacks a ``Linear4bit`` for its AVX512-BF16 CPU kernel on the layer's first
eval-mode forward (bfloat16 block scales, another weight layout). That packed form breaks
everything else peftkit does with the layer: dequantizing it gives wrong values, a training
forward over it fails or loses the input gradient, and the repack itself fails on layers with
fewer than 64 inputs. So every 4-bit layer peftkit creates or touches is ``settle``d: its repack
switch is turned off, and a layer packed before peftkit saw it is unpacked first.

Under FSDP (``torch.distributed.fsdp.fully_shard``) a 4-bit layer's weight stops being a
``Params4bit``: it is split into a plain sharded tensor (FSDP2 shards the packed uint8 codes like
any parameter, and leaves integer parameters out of mixed-precision casts), and inside the
forward it is a plain gathered tensor without the quantization state (block scales, their
double-quantized scales, the code book). bitsandbytes' ``Linear4bit.forward`` rebuilds the
``Params4bit`` from the state kept on the module (``layer.quant_state``), so every 4-bit layer
peftkit creates or touches keeps its state there as well (``settle``); ``is_quantized`` and
``dequantized_weight`` recognise such a layer too (DoRA reads its base weight in the forward).

Merging is this module's other job (``dense_copy`` / ``quantized_copy``): the host layer
swaps a 4-bit base for a dense copy holding the dequantized weights — the function the adapter
was trained against — folds the units into that, and requantizes only when asked. The original
4-bit module is kept while merged, so unmerging restores it exactly.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .errors import ConfigError, ModelError
from .targeting import is_conv1d, logical_modules, matches, output_head_names, replace_module
from .unit import Host


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # a regular dependency; a broken install says so
        raise ConfigError(f"4-bit quantization needs bitsandbytes, which failed to import: {exc}") from None
    return bnb


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (peftkit's or one transformers loaded), also one whose
    weight FSDP has replaced by a shard or by the gathered codes."""
    weight = module._parameters.get("weight")  # its own parameter, not a host's ``weight`` property
    if type(weight).__name__ == "Params4bit":
        return True
    bnb = sys.modules.get("bitsandbytes")  # not imported: no module can be one of its layers
    return (weight is not None and bnb is not None and isinstance(module, bnb.nn.Linear4bit)
            and getattr(module, "quant_state", None) is not None)


def _sharded(weight: torch.Tensor) -> bool:
    return hasattr(weight, "full_tensor")  # a DTensor: this process holds only a part


def four_bit_weight(layer: nn.Module) -> torch.Tensor:
    """The 4-bit ``layer``'s weight as a ``Params4bit`` with its quantization state.

    Inside FSDP's forward the weight is the gathered packed codes as a plain tensor; it is
    rebuilt from the state kept on the layer, as bitsandbytes' own forward does
    (``fix_4bit_weight_quant_state_from_module``). A weight that is only a shard (outside
    the forward of its FSDP block) has no whole value on this process: a ``ModelError``."""
    weight = layer._parameters.get("weight")
    if getattr(weight, "quant_state", None) is not None:
        return weight
    if weight is not None and _sharded(weight):
        raise ModelError(f"{type(layer).__name__}: the 4-bit weight is sharded across processes (FSDP); "
                         "it is whole only inside the forward of its block")
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(layer)
    return layer.weight


def settle(layer: nn.Module) -> nn.Module:
    """Keep the 4-bit ``layer`` in bitsandbytes' portable layout; returns it.

    Turns off the AVX512-BF16 CPU repack (``support_avx512bf16_for_cpu``) and unpacks a weight
    that was repacked already (an eval forward before peftkit saw the layer). Unpacking restores
    the 4-bit codes exactly; the block scales keep the bfloat16 rounding the repack gave them.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):  # bitsandbytes >= 0.48
        layer.support_avx512bf16_for_cpu = False
    weight = layer._parameters.get("weight")
    state = getattr(weight, "quant_state", None)
    if state is None:  # under FSDP (a shard or the gathered codes): the layer's state stays
        return layer
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    # the state on the module too: what bitsandbytes restores a gathered FSDP weight from
    layer.quant_state = weight.quant_state
    return layer


def settle_all(model: nn.Module) -> nn.Module:
    """``settle`` every 4-bit layer of ``model``; returns the model."""
    for module in model.modules():
        if is_quantized(module):
            settle(module)
    return model


def _to_4bit(weight: torch.Tensor, bias: torch.Tensor | None, quant_type: str, double_quant: bool,
             compute_dtype: torch.dtype) -> nn.Module:
    """A ``Linear4bit`` computing ``x @ weight.T + bias``; ``weight`` is (out, in)."""
    bnb = _bnb()
    out_features, in_features = weight.shape
    # The packed codes stay in bitsandbytes' default uint8 storage, also for FSDP: FSDP2 shards
    # and gathers an integer parameter as it is and leaves it out of a mixed-precision policy's
    # cast. (A float storage is what FSDP1's flat parameters need; under FSDP2 a float storage
    # other than the policy's ``param_dtype`` would be cast, and the codes with it.)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type, quant_storage=torch.uint8,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type=quant_type,
                                     quant_storage=torch.uint8)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype).clone(), requires_grad=False)
    return settle(layer.to(weight.device))  # quantizes on the move; settle keeps the state on the layer


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a 4-bit layer computes with, in its compute dtype."""
    bnb = _bnb()
    w = four_bit_weight(settle(module))
    dense = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return dense.to(module.compute_dtype or torch.float32)


def dense_copy(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` equal to the 4-bit ``module`` (dequantized weights, compute dtype)."""
    weight = dequantized_weight(module)
    layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if module.bias is not None:
            layer.bias.copy_(module.bias.to(weight.dtype))
    layer.requires_grad_(False)
    layer.train(module.training)
    return layer


def quantized_copy(dense: nn.Linear, like: nn.Module) -> nn.Module:
    """``dense`` quantized again with the settings of the 4-bit layer ``like``."""
    weight = four_bit_weight(settle(like))
    state = weight.quant_state
    layer = _to_4bit(dense.weight, dense.bias, state.quant_type, weight.compress_statistics,
                     like.compute_dtype or dense.weight.dtype)
    layer.train(like.training)
    return layer


def quantize(model: nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, skip_modules: list[str] | None = None) -> nn.Module:
    """Replace the linear layers of ``model`` by 4-bit ones, in place; returns the model.

    Every ``nn.Linear`` and transformers ``Conv1D`` is quantized except the output head(s)
    (LM head, classifier, score) and the modules named in ``skip_modules`` (names or dotted
    suffixes); embeddings and norms are not linear layers and stay as they are.
    ``compute_dtype`` defaults to each layer's own dtype (float32 on a float32 model).
    """
    if bits != 4:
        raise ConfigError(f"bits: peftkit quantizes to 4 bits (NF4/FP4), found {bits!r}")
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quant_type: expected 'nf4' or 'fp4', found {quant_type!r}")
    skip = list(skip_modules or [])
    heads = output_head_names(model)
    chosen = [(name, m) for name, m in logical_modules(model)
              if name and (isinstance(m, nn.Linear) or is_conv1d(m)) and not is_quantized(m)
              and name not in heads and not matches(skip, name)]
    if not chosen:
        raise ConfigError(f"quantize: {type(model).__name__} has no linear layer to quantize "
                          f"(heads and skip_modules are left out)")
    for name, module in chosen:
        weight = module.weight.t() if is_conv1d(module) else module.weight
        dtype = compute_dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        layer = _to_4bit(weight, module.bias, quant_type, double_quant, dtype)
        layer.train(module.training)
        replace_module(model, name, layer)
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every 4-bit layer of ``model`` by its dense copy, in place; returns the model."""
    for name, module in [(n, m) for n, m in logical_modules(model) if n and is_quantized(m)]:
        replace_module(model, name, dense_copy(module))
    return model


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the base model's parameters held in 4-bit (with their scales) and in 16/32-bit
    (embeddings, norms, heads, skipped layers); adapters are not counted. Of a model sharded by
    FSDP: the whole model's (a shard's ``numel`` is its whole tensor's)."""
    four_bit = other = 0
    seen = set()
    for module in model.modules():
        if is_quantized(module):
            w = settle(module).weight
            four_bit += w.numel() * w.element_size()
            state = getattr(w, "quant_state", None)
            if state is None:  # a shard under FSDP: the state is on the layer
                state = module.quant_state
            four_bit += state.absmax.numel() * state.absmax.element_size()
            if state.nested and state.state2 is not None:
                four_bit += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4
            seen.add(id(w))
    for module in model.modules():
        if isinstance(module, Host):
            for name in module.names():
                owned = module.owned(name)  # None: the host holds nothing of this adapter's own
                if owned is not None:
                    seen.update(id(p) for p in owned.parameters())
    for p in model.parameters():
        if id(p) not in seen:
            other += p.numel() * p.element_size()
    return {"quantized_bytes": four_bit, "dense_bytes": other}


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """What training over a 4-bit base needs; returns the model.

    - Every 4-bit layer is ``settle``d (no AVX512-BF16 CPU repack: it cannot train).
    - Layer norms are kept in float32 (a half-precision norm over 4-bit outputs is where
      training diverges); nothing else is upcast (no blanket float32 copy of the embeddings).
    - With ``gradient_checkpointing``, the model's input embeddings produce outputs that require
      grad (``enable_input_require_grads``), so checkpointed blocks have something to
      differentiate although the embedding is frozen, and non-reentrant checkpointing is turned on.
    """
    settle_all(model)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            module.float()
    if gradient_checkpointing:
        enable = getattr(model, "enable_input_require_grads", None)
        if callable(enable):
            enable()
        else:
            model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        turn_on = getattr(model, "gradient_checkpointing_enable", None)
        if callable(turn_on):
            turn_on(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
