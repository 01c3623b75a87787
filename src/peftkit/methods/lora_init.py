"""LoRA initialisations that read the base weight, and what follows from them.

``LoraConfig(init_lora_weights=...)`` as HF PEFT defines each value (same formulas, same file):

- ``"pissa"`` — PiSSA, "Principal Singular values and Singular vectors Adaptation" (Meng, Wang,
  Zhang, 2024). A full SVD ``W = U S Vᵀ`` of the base weight (out, in), in float32;
  with ``S_r = S[:r] / s`` (s the LoRA scaling): ``A = √S_r · Vᵀ[:r]``, ``B = U[:, :r] · √S_r``, and the
  base weight becomes the residual ``W_res = W − s·B·A`` (in the base's dtype). The adapted model
  equals the base at init; the adapter trains the principal directions.
- ``"pissa_niter_N"`` — the same from ``torch.svd_lowrank(W, r, niter=N)`` (a randomized SVD:
  fast, and not reproducible; see below).
- ``"olora"`` — OLoRA (Büyükakyüz, 2024): ``W = Q R`` (QR, float32); ``A = R[:r]``, ``B = Q[:, :r]``,
  ``W_res = W − s·B·A``. Over a 4-bit base the weight is dequantized first and the residual is
  quantized again with the layer's own settings, as HF PEFT does.
- ``"orthogonal"`` — A and B from one random orthogonal r×r matrix Q (r even): A from Q's even
  rows, B from its odd rows (0-based), each through a random Gaussian projection and divided by 10,
  so ``B·A = 0`` (Q's rows are orthogonal) while A and B are not zero. The base is untouched.
- ``"loftq"`` with ``loftq_config = {"loftq_bits": 4 | 8, "loftq_iter": N}`` — LoftQ, "LoRA-
  Fine-Tuning-aware Quantization" (Li et al., 2023). N times: quantize ``W − L·R`` (first ``W``),
  ``Q`` the dequantized result, then ``L·R`` the rank-r truncated SVD of ``W − Q``
  (``L = U_r √S_r``, ``R = √S_r V_rᵀ``). The base weight becomes ``Q`` (the dequantized values, in the
  base's dtype: HF PEFT's LoftQ base is a float model whose weights are exactly representable in
  NF4 with 64-element blocks and no double quantization, to be stored in 4 bits afterwards —
  ``quantize_base``); the adapter is ``B = L/√s``, ``A = R/√s``, so ``Q + s·B·A = Q + L·R`` is closer
  to W than Q alone. (HF PEFT takes ``A = R``, ``B = L``; the same when s = 1, i.e. lora_alpha = r.)
  4 bits: bitsandbytes' NF4 (``quantize_4bit``, blocksize 64, no double quantization), which runs
  on the CPU as well: peftkit's LoftQ needs no GPU (HF PEFT's runs on CUDA/XPU only). 8 bits:
  bitsandbytes' row-wise int8 (``int8_vectorwise_quant``) of a float16 copy, as HF PEFT's
  ``Int8Params`` does.

They apply to Linear layers (also 4-bit ones: OLoRA and orthogonal) and, except OLoRA and LoftQ,
to GPT-2's ``Conv1D``. As in HF PEFT an ``Embedding`` falls back to LoRA's default init (with a
``PeftkitWarning``); a ``Conv2d`` is refused (HF PEFT refuses it too).

**Base-modifying inits** (pissa, pissa_niter_N, olora, loftq) change the base weight. The file
keeps ``init_lora_weights`` (and ``loftq_config``), so a loader — peftkit or HF PEFT — runs the
init again on the fresh base before loading A and B: the base becomes the same residual and the
adapter computes what was trained. That holds for the deterministic ones; a randomized SVD
(``pissa_niter_N``) gives another residual, so peftkit saves such an adapter *converted* by
default (``peftkit.save(plain_lora=...)``) and warns when loading an unconverted one.

**Conversion** (HF PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``): a
PiSSA/OLoRA adapter trained from ``(A₀, B₀)`` over ``W_res = W − s·B₀A₀`` computes
``W_res + s·BA = W + s·(BA − B₀A₀) = W + s·[B | −B₀]·[A ; A₀]``: a plain LoRA of rank 2r against
the untouched W (lora_alpha doubled too, so the scaling stays; ×√2 with rsLoRA). The unit keeps
A₀, B₀ from its init (non-persistent buffers) for this, so no directory of the initial adapter
is needed.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .. import quant
from ..errors import ConfigError, PeftkitWarning
from ..targeting import is_conv1d

_NITER = re.compile(r"pissa_niter_(\d+)")
# The values this module implements (beside LoRA's own True / False / "gaussian").
DATA_INITS = ("pissa", "pissa_niter_N", "olora", "orthogonal", "loftq")
# HF PEFT's values peftkit does not implement (named in the refusal).
_HF_ONLY = {"corda": "CorDA", "mica": "MiCA", "lora_ga": "LoRA-GA"}
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}
NF4_BLOCKSIZE = 64  # bitsandbytes' default, what HF PEFT's LoftQ quantizes with


def kind(init: Any) -> str:
    """``"plain"`` (LoRA's own inits), ``"pissa"`` (also ``pissa_niter_N``), ``"olora"``,
    ``"orthogonal"`` or ``"loftq"``; ``""`` for a value that is none of them."""
    if isinstance(init, bool) or not isinstance(init, str):
        return "plain" if isinstance(init, bool) else ""
    if init == "pissa" or _NITER.fullmatch(init):
        return "pissa"
    if init in ("olora", "orthogonal", "loftq"):
        return init
    return ""


def niter(init: Any) -> int | None:
    """N of ``"pissa_niter_N"``; None for any other value."""
    match = _NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def modifies_base(init: Any) -> bool:
    """The init writes into the base weight (PiSSA, OLoRA, LoftQ)."""
    return kind(init) in ("pissa", "olora", "loftq")


def reloads_exactly(init: Any) -> bool:
    """Running the init again on the untouched base gives the same base (not a randomized SVD)."""
    return niter(init) is None


def refusal(init: Any, own: tuple) -> str:
    """The ``ConfigError`` text for an ``init_lora_weights`` peftkit does not implement; ``own``:
    the plain values lora.py accepts (``INIT_CHOICES``)."""
    extra = [repr(v) for v in own if v not in (True, False, "gaussian")] + \
        [repr(v) + (" (N >= 0 iterations)" if v == "pissa_niter_N" else "") for v in DATA_INITS]
    name = _HF_ONLY.get(init) if isinstance(init, str) else None
    what = f"{init!r} is HF PEFT's {name}, which peftkit does not implement; " if name else ""
    return (f"init_lora_weights: {what}peftkit supports True, False or 'gaussian', or "
            f"{', '.join(extra[:-1])} or {extra[-1]}, found {init!r}")


def check_loftq_config(value: Any, init: Any) -> dict:
    """``loftq_config`` as the file holds it: ``{"loftq_bits": 4 | 8, "loftq_iter": N >= 1}`` with
    ``init_lora_weights="loftq"`` (HF PEFT's defaults fill missing keys), ``{}`` otherwise; a
    non-empty one without LoftQ is ignored with a warning, as HF PEFT does (its LoftQ example
    writes such files: ``init_lora_weights`` set back to True once the base is quantized)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"loftq_config: expected a mapping with loftq_bits and loftq_iter, found {value!r}")
    if init != "loftq":
        if value:
            warnings.warn(f"loftq_config {value!r} is ignored: init_lora_weights is {init!r}, not 'loftq' "
                          "(as in HF PEFT)", PeftkitWarning, stacklevel=4)
        return {}
    unknown = [k for k in value if k not in LOFTQ_DEFAULTS]
    if unknown:
        raise ConfigError(f"loftq_config: unknown key {unknown[0]!r} (known: loftq_bits, loftq_iter), found {value!r}")
    out = {**LOFTQ_DEFAULTS, **value}
    bits, iters = out["loftq_bits"], out["loftq_iter"]
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ConfigError(f"loftq_config: loftq_bits: expected 4 (NF4) or 8 (int8), found {bits!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ConfigError(f"loftq_config: loftq_iter: expected a positive integer, found {iters!r}")
    return out


_STRUCTURE_ONLY = [False]


@contextlib.contextmanager
def building_structure_only():
    """Within: units are built without their data-driven init and no base weight is written
    (``io.load`` checks a file's keys and shapes against such a build before the real one, so
    a refused file leaves a base-modifying init's base untouched)."""
    _STRUCTURE_ONLY.append(True)
    try:
        yield
    finally:
        _STRUCTURE_ONLY.pop()


def structure_only() -> bool:
    return _STRUCTURE_ONLY[-1]


# -- which layers ----------------------------------------------------------------------------


def applies_to(init: Any, module: nn.Module) -> bool:
    """The init is computed for this layer (else: LoRA's default init, an Embedding's case)."""
    return kind(init) == "plain" or not isinstance(module, nn.Embedding)


def check_layer(init: Any, module: nn.Module, path: str, r: int) -> None:
    """``ConfigError`` for a layer the init cannot start (before anything is changed)."""
    k = kind(init)
    if k == "plain" or isinstance(module, nn.Embedding):
        return
    if isinstance(module, nn.Conv2d):
        raise ConfigError(f"init_lora_weights={init!r} cannot start {path!r} (Conv2d): it is defined for Linear "
                          "layers (HF PEFT refuses it on Conv2d too); target the Linear layers or use True/'gaussian'")
    four_bit = quant.is_quantized(module)
    if k in ("olora", "loftq") and is_conv1d(module):
        raise ConfigError(f"init_lora_weights={init!r} cannot start {path!r} (GPT-2's Conv1D, a transposed "
                          "weight): HF PEFT's implementation builds A and B of the wrong shapes there, so a file "
                          "would not load in HF PEFT; use 'pissa' or 'orthogonal' on this model")
    if four_bit and k == "pissa":
        raise ConfigError(f"init_lora_weights={init!r} cannot start {path!r}: its base is already in 4 bits and "
                          "PiSSA needs the float weight (HF PEFT refuses it too); apply PiSSA to the float model "
                          "and quantize the residual afterwards (peftkit train --method qlora --init pissa does)")
    if four_bit and k == "loftq":
        raise ConfigError(f"init_lora_weights='loftq' cannot start {path!r}: its base is already in 4 bits; "
                          "LoftQ quantizes the float weight itself: apply it to the float model, then store "
                          "the base in 4 bits with peftkit.methods.lora_init.quantize_base (peftkit train "
                          "--method qlora --init loftq does)")
    if k != "orthogonal":
        weight = module.weight
        if not four_bit and weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ConfigError(f"init_lora_weights={init!r} cannot start {path!r}: its weight is {weight.dtype}; "
                              "expected a float weight")
        n_out, n_in = _out_in(module)
        if r > min(n_out, n_in):
            raise ConfigError(f"init_lora_weights={init!r} cannot start {path!r} with rank {r}: the weight is "
                              f"({n_out}, {n_in}), of rank at most {min(n_out, n_in)}; lower r (rank_pattern)")


def _out_in(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):  # also a 4-bit Linear, whose packed weight has another shape
        return module.out_features, module.in_features
    n_in, n_out = module.weight.shape  # Conv1D: (in, out)
    return n_out, n_in


# -- the inits (weights as (out, in)) --------------------------------------------------------


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pissa(weight: torch.Tensor, r: int, scaling: float, iterations: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res) of PiSSA for ``weight`` (out, in); a randomized SVD with ``iterations``."""
    w = weight.to(_work_dtype(weight.dtype))
    if iterations is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, r, niter=iterations)
        vh = v.t()
    root = (s / scaling).sqrt()
    a = root[:, None] * vh  # √S_r Vᵀ_r: (r, in)
    b = u * root[None, :]  # U_r √S_r: (out, r)
    return a.contiguous(), b.contiguous(), w - (scaling * b) @ a


def olora(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res) of OLoRA for ``weight`` (out, in)."""
    w = weight.to(_work_dtype(weight.dtype))
    q, upper = torch.linalg.qr(w)
    a, b = upper[:r].contiguous(), q[:, :r].contiguous()
    return a, b, w - (scaling * b) @ a


def orthogonal(n_in: int, n_out: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A = 0 and neither zero (float32, from the global RNG, as HF PEFT draws them)."""
    if r % 2:
        raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank (HF PEFT's rule), found r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    even, odd = q[0::2], q[1::2]  # rows 0, 2, ... and 1, 3, ...: orthogonal to each other
    a = (torch.randn(n_in, r // 2) @ even).t() / 10.0  # (r, in)
    b = (torch.randn(r // 2, n_out).t() @ odd) / 10.0  # (out, r)
    return a.contiguous(), b.contiguous()


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized to NF4 (blocks of 64, float32 scales) and dequantized (float32)."""
    bnb = quant._bnb()
    packed, state = bnb.functional.quantize_4bit(weight.to(torch.float32).contiguous(), blocksize=NF4_BLOCKSIZE,
                                                 compress_statistics=False, quant_type="nf4")
    return bnb.functional.dequantize_4bit(packed, state).to(torch.float32)


def int8_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (as float16) quantized to row-wise int8 and dequantized (float32)."""
    bnb = quant._bnb()
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return bnb.functional.int8_vectorwise_dequant(codes, scales).to(torch.float32)


def loftq(weight: torch.Tensor, r: int, scaling: float, bits: int = 4, iterations: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, Q) of LoftQ for ``weight`` (out, in): Q the dequantized base, Q + s·B·A ≈ W."""
    roundtrip = nf4_roundtrip if bits == 4 else int8_roundtrip
    w = weight.to(torch.float32)
    target = w
    for step in range(iterations):
        q = roundtrip(target)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = s[:r].sqrt()
        left, right = u[:, :r] * root[None, :], root[:, None] * vh[:r]  # L (out, r), R (r, in)
        if step + 1 < iterations:
            target = w - left @ right
    factor = math.sqrt(scaling)
    return (right / factor).contiguous(), (left / factor).contiguous(), q


# -- one layer's start ---------------------------------------------------------------------


@dataclass
class Start:
    """A layer's initial A (r, in) and B (out, r), and what becomes of its base weight: ``base``,
    the new weight as (out, in) (None: untouched)."""

    a: torch.Tensor
    b: torch.Tensor
    base: torch.Tensor | None = None


def start(init: Any, module: nn.Module, r: int, scaling: float, loftq_config: dict) -> Start:
    """Compute the init for ``module`` (checked by ``check_layer``); changes nothing."""
    k = kind(init)
    if k == "orthogonal":
        n_out, n_in = _out_in(module)
        a, b = orthogonal(n_in, n_out, r)
        return Start(a, b)
    with torch.no_grad():
        weight = base_weight(module)
        if k == "pissa":
            return Start(*pissa(weight, r, scaling, niter(init)))
        if k == "olora":
            return Start(*olora(weight, r, scaling))
        a, b, q = loftq(weight, r, scaling, loftq_config["loftq_bits"], loftq_config["loftq_iter"])
        return Start(a, b, q)


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): a 4-bit layer's dequantized (in its quantization dtype)."""
    if quant.is_quantized(module):
        w = quant.settle(module).weight
        return quant._bnb().functional.dequantize_4bit(w.data, w.quant_state)
    return module.weight.t() if is_conv1d(module) else module.weight


def write_base(module: nn.Module, weight: torch.Tensor) -> nn.Parameter | None:
    """Put ``weight`` (out, in) into ``module``; a 4-bit layer is quantized again with its own
    settings (returns its previous 4-bit weight, to be put back by ``put_back``)."""
    with torch.no_grad():
        if quant.is_quantized(module):
            old = quant.settle(module).weight
            bnb = quant._bnb()
            new = bnb.nn.Params4bit(weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                                    blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                    quant_type=old.quant_type, quant_storage=old.quant_storage, module=module)
            module.weight = new.to(old.device)
            quant.settle(module)
            return old
        target = module.weight
        target.copy_((weight.t() if is_conv1d(module) else weight).to(target.dtype))
        return None


def put_back(module: nn.Module, old: nn.Parameter) -> None:
    """Restore the 4-bit weight ``write_base`` replaced."""
    module.weight = old
    state = getattr(old, "quant_state", None)
    if state is not None:
        module.quant_state = state
    quant.settle(module)


# -- converting to a plain LoRA ----------------------------------------------------------------


def converted_pair(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor | None, b0: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[A ; A₀]``, ``[B | −B₀]``: ``B'A' = BA − B₀A₀`` (rank 2r); without an initial pair (a layer
    whose base the init left alone) A and B padded with zeros to rank 2r, the same product."""
    if a0 is None:
        a0, b0 = torch.zeros_like(a), torch.zeros_like(b)
        return torch.cat([a, a0], dim=0), torch.cat([b, b0], dim=1)
    return (torch.cat([a, a0.to(a.dtype)], dim=0),
            torch.cat([b, -b0.to(b.dtype)], dim=1))


def converted_config_fields(config: Any) -> dict[str, Any]:
    """The fields of the plain-LoRA file a conversion writes (HF PEFT's rule): init True, ranks
    doubled, alphas doubled (×√2 with rsLoRA, which keeps alpha/√r)."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError("plain_lora: an adapter with use_rslora and rank_pattern/alpha_pattern cannot be "
                          "converted (doubling the ranks changes rsLoRA's per-layer scaling; HF PEFT refuses "
                          "it too); save it as trained (plain_lora=False)")
    return {
        "init_lora_weights": True,
        "loftq_config": {},
        "r": config.r * 2,
        "lora_alpha": config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2),
        "rank_pattern": {k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        "alpha_pattern": {k: 2 * v for k, v in (config.alpha_pattern or {}).items()},
    }


# -- a 4-bit base after the init (QLoRA with PiSSA or LoftQ) -----------------------------------


def quantizes_after(config: Any) -> bool:
    """A 4-bit base for this config is quantized after the adapter is applied, from the weights
    the init wrote (PiSSA's residual: QPiSSA; LoftQ's base), not before."""
    return kind(getattr(config, "init_lora_weights", True)) in ("pissa", "loftq")


def quantize_base(model: nn.Module, quant_type: str = "nf4") -> nn.Module:
    """Store the base of a model adapted with PiSSA or LoftQ in 4 bits, in place; returns it.

    Adapted Linear/Conv1D base layers (not the output heads) become 4-bit layers: a layer
    holding a LoftQ base in NF4 without double quantization (its values are on that grid
    already, so nothing changes), the others as ``peftkit.quantize`` does (double quantization
    on); every other linear layer goes through ``peftkit.quantize``. Conv1D bases become
    ``Linear4bit``s in the (out, in) layout, their units follow."""
    from ..layer import AdapterLayer
    from ..state import hosts
    from ..targeting import logical_modules, output_head_names

    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quant_type: expected 'nf4' or 'fp4', found {quant_type!r}")
    heads = output_head_names(model)
    for path, host in list(hosts(model)):
        if not isinstance(host, AdapterLayer) or path in heads:
            continue
        base = host.base_layer
        if not (isinstance(base, nn.Linear) or is_conv1d(base)) or quant.is_quantized(base):
            continue
        units = list(host.adapters.values())
        exact = any(getattr(u, "base_change", None) == "quantized" for u in units)
        if exact and quant_type != "nf4":
            raise ConfigError(f"{path}: a LoftQ base is quantized to NF4; found quant_type {quant_type!r} "
                              "(drop --quantize fp4)")
        conv1d = is_conv1d(base)
        weight = base.weight.t() if conv1d else base.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        layer = quant._to_4bit(weight, base.bias, quant_type, not exact, dtype)
        layer.train(base.training)
        layer.requires_grad_(False)
        host.base_layer = layer
        for unit in units:
            if conv1d and hasattr(unit, "transposed"):
                unit.transposed = False
            if "_base" in unit.__dict__:  # DoRA reads its base layer
                unit.__dict__["_base"] = layer
    left = [n for n, m in logical_modules(model) if n and (isinstance(m, nn.Linear) or is_conv1d(m))
            and not quant.is_quantized(m) and n not in heads]
    if left:
        quant.quantize(model, quant_type=quant_type)
    return model
