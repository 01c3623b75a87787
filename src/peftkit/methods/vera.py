"""VeRA — "VeRA: Vector-based Random Matrix Adaptation" (Kopiczko et al., 2024).

Every adapted layer gets ``ΔW x = Λ_b B Λ_d A x``: A (r, in) and B (out, r) are frozen random
matrices shared by all layers (and by all VeRA adapters of the model); what trains is two
vectors per layer, ``vera_lambda_d`` (r,) and ``vera_lambda_b`` (out,). So r can be far larger
than LoRA's (256 by default) for a tiny fraction of LoRA's parameters.

The shared projections (HF PEFT's facts, so that files go both ways):

- one pair per model, sized to the largest target: A (r, max in), B (max out, r); a layer uses
  the top-left corner, ``A[:, :in]`` and ``B[:out, :]``;
- generated on the CPU from ``torch.Generator().manual_seed(projection_prng_key)``: A first,
  then B, each Kaiming-uniform with gain √2 over its own fan-in (A's columns, B's r), in
  float32; a file saved with ``save_projection=False`` holds no ``vera_A``/``vera_B`` and
  loads to equal outputs because the same key regenerates the same matrices;
- with ``save_projection=True`` (the default) the file holds them under HF's keys
  ``base_model.vera_A`` / ``base_model.vera_B``, and loading copies them in.

They live in ``VeraProjections``, a ``Host`` installed as ``model.peftkit_vera`` (a module the
model never had: unloading, or deleting the last VeRA adapter, removes it). They are buffers,
not parameters: nothing trains them, and no adapter owns them. The per-layer units
(``VeraLinear``, in the layers' ``AdapterLayer``s) read them from the host at each call, so
moving the model moves them once. (A model that runs or lists its children as layers, an
``nn.Sequential``, cannot take such a child: it is refused.) A file's projections are copied
into the shared ones, which every VeRA adapter of the model reads (as in HF PEFT).

Init (HF PEFT): ``vera_lambda_b`` = 0, so the adapted model equals the base, and
``vera_lambda_d`` = ``d_initial`` (0.1); ``init_weights=False`` gives λ_b = 1 and λ_d ~ N(0, 1),
a random update at once. ``vera_dropout`` drops the layer's input to the adapter in training.

Layer types: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored (in, out): ΔW is
returned in that layout for merging). The layer type decides the layout; ``fan_in_fan_out`` is
set to it in the adapter's config, as HF PEFT does (with mixed types HF leaves the last
target's, and so does peftkit). Every other type is a ``ConfigError`` naming the module.

Several VeRA adapters (HF PEFT's rules): all share the first one's projections, so a later one
must have the same ``projection_prng_key``, ``save_projection`` and ``r``, and layers no larger
than the projections (add the adapter with the largest layers first). HF PEFT accepts a smaller
``r`` there and then fails in the forward pass; peftkit refuses it up front. A later adapter
whose layers are smaller than the projections uses the larger ones' corner: with
``save_projection=False`` its file reproduces it only beside such an adapter (a warning says so).

Several active adapters on one layer (VeRA, LoRA, ...) compose by addition: each adds its own
term to the output so far; merging adds ΔW to W, in the layer's own layout.

``bias``: "none", "all" or "vera_only" (the adapted layers' biases train too).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
import torch.nn as nn

from .. import architectures
from ..config import TargetedConfig, check_bool, check_number, check_positive_int
from ..errors import ConfigError, ModelError, PeftkitWarning
from ..layer import DeltaUnit, Host
from ..unit import MixTerms, adapter_factory, autocast_on
from ..registry import CliMethod, Method, register
from ..targeting import is_conv1d

ATTR = "peftkit_vera"  # where the shared projections sit on the model
SUPPORTED = "Linear, Conv1D"
FILE_KEYS = ("base_model.vera_A", "base_model.vera_B")  # HF PEFT's keys of the shared projections
# The seeds torch.Generator.manual_seed takes.
SEED_RANGE = (-0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF)


@dataclass
class VeraConfig(TargetedConfig):
    """VeRA settings; names, meanings and defaults as in HF PEFT's ``VeraConfig``.

    ``r`` (rank of the shared projections), ``projection_prng_key`` (their seed),
    ``save_projection`` (write them into the file), ``vera_dropout``, ``d_initial`` (λ_d's
    initial value), ``fan_in_fan_out`` (set from the layer type), ``bias`` ("none", "all"),
    ``init_weights`` (False: λ_b = 1, λ_d random: the adapter changes the model at once).
    """

    peft_type: ClassVar[str] = "VERA"
    # Every field of HF PEFT 0.21's VeraConfig is implemented.
    unsupported_defaults: ClassVar[dict[str, Any]] = {}

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool) or not SEED_RANGE[0] <= key <= SEED_RANGE[1]:
            raise ConfigError(f"projection_prng_key: expected an integer seed in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], "
                              f"found {key!r}")
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            check_bool(name, getattr(self, name))
        check_number("vera_dropout", self.vera_dropout, 0.0, 1.0)
        check_number("d_initial", self.d_initial)
        if self.bias not in ("none", "all", "vera_only"):
            raise ConfigError(f"bias: expected 'none', 'all' or 'vera_only', found {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:  # HF PEFT refuses it too
            raise ConfigError(f"layers_pattern: expected layers_to_transform to be set with it, "
                              f"found layers_pattern={self.layers_pattern!r} and layers_to_transform=None")

    def file_dict(self, adapted: list[str]) -> dict[str, Any]:
        # HF PEFT's VeraConfig has no exclude_modules (it would warn about an unexpected field);
        # target_modules lists the exact modules adapted, so the file needs none.
        data = super().file_dict(adapted)
        data.pop("exclude_modules", None)
        return data


# -- the shared projections -------------------------------------------------------------------


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = √3 · √2 / √fan_in, fan_in = shape[1] (computed in HF PEFT's order, so
    the same seed gives bit-equal matrices)."""
    bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1]))
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def make_projections(r: int, n_in: int, n_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, n_in), B (n_out, r)), float32 on the CPU, from the seed ``key``: A drawn first."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = _kaiming_uniform((r, n_in), generator)
    vera_b = _kaiming_uniform((n_out, r), generator)
    return vera_a, vera_b


class VeraProjections(Host):
    """The model's shared frozen projections (``model.peftkit_vera``) and the VeRA adapters using them.

    A host the model never had: ``restore`` gives None (the core deletes it), it owns no
    adapter parameters (``owned`` is None: the projections are frozen buffers, outside the
    model's ``state_dict``), and it takes no part in activation (the units do)."""

    def __init__(self, vera_a: torch.Tensor, vera_b: torch.Tensor, key: int, save_projection: bool) -> None:
        super().__init__()
        self.register_buffer("vera_A", vera_a, persistent=False)
        self.register_buffer("vera_B", vera_b, persistent=False)
        self.projection_prng_key = key
        self.save_projection = save_projection
        self.users: list[str] = []  # the VeRA adapters sharing them, in the order they were added

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    # -- the Host protocol ---------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.users)

    def remove(self, name: str) -> None:
        self.users.remove(name)

    def set_active(self, names: Iterable[str]) -> None:
        pass

    def set_disabled(self, disabled: bool) -> None:
        pass

    def owned(self, name: str) -> nn.Module | None:
        return None

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        # HF PEFT's keys sit on its tuner (``base_model.``), not under a module path.
        return dict(zip(FILE_KEYS, (self.vera_A, self.vera_B))) if self.save_projection else {}

    def restore(self, merge: bool) -> None:
        return None

    def forward(self, *args, **kwargs):
        raise ModelError("the shared VeRA projections are read by the adapted layers; they are not a layer to call")

    def extra_repr(self) -> str:
        return (f"r={self.r}, in={self.vera_A.shape[1]}, out={self.vera_B.shape[0]}, "
                f"projection_prng_key={self.projection_prng_key}, adapters={self.users}")


# -- the unit -----------------------------------------------------------------------------------


class VeraLinear(DeltaUnit):
    """VeRA on one ``nn.Linear`` (``transposed``: a ``Conv1D``, weight (in, out)): λ_b, λ_d and a
    reference (not a submodule) to the shared projections."""

    def __init__(self, shared: VeraProjections, n_in: int, n_out: int, transposed: bool, r: int, dropout: float,
                 init: bool, d_initial: float, factory: dict) -> None:
        super().__init__()
        self.__dict__["_shared"] = shared  # not registered: the host holds the tensors once
        self.n_in, self.n_out, self.transposed, self.r = n_in, n_out, transposed, r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None  # None: no call, no copy
        if init:  # λ_b = 0: the update starts at zero
            lambda_b, lambda_d = torch.zeros(n_out), torch.full((r,), float(d_initial))
        else:
            lambda_b, lambda_d = torch.ones(n_out), torch.randn(r)
        self.vera_lambda_b = nn.Parameter(lambda_b.to(**factory))
        self.vera_lambda_d = nn.Parameter(lambda_d.to(**factory))

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's corner of the shared matrices, A (r, in) and B (out, r), as λ's dtype and device."""
        shared = self._shared
        vera_a, vera_b = shared.vera_A[:, : self.n_in], shared.vera_B[: self.n_out, :]
        lam = self.vera_lambda_d
        if vera_a.dtype != lam.dtype or vera_a.device != lam.device:
            vera_a, vera_b = vera_a.to(lam), vera_b.to(lam)
        return vera_a, vera_b

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        vera_a, vera_b = self.projections()
        h = x if self.dropout is None else self.dropout(x)
        if h.dtype != vera_a.dtype:
            h = h.to(vera_a.dtype)
        h = (h.reshape(-1, h.shape[-1]) @ vera_a.t()) * self.vera_lambda_d  # Λ_d A x: (N, r)
        up = vera_b * self.vera_lambda_b.unsqueeze(1)  # Λ_b B: (out, r), cheaper than scaling (N, out)
        out2d = out.reshape(-1, out.shape[-1])
        if out2d.dtype == h.dtype:
            if not torch.is_grad_enabled() and not autocast_on(out.device):  # inference, no autocast:
                # into the base output, no new (N, out) tensor
                return out2d.addmm_(h, up.t()).view(out.shape)
            return torch.addmm(out2d, h, up.t()).view(out.shape)
        return (out2d + (h @ up.t()).to(out.dtype)).view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        vera_a, vera_b = self.projections()
        delta = (self.vera_lambda_b.unsqueeze(1) * vera_b) @ (self.vera_lambda_d.unsqueeze(1) * vera_a)  # (out, in)
        return delta.t() if self.transposed else delta

    def mix_terms(self) -> MixTerms:
        vera_a, vera_b = self.projections()
        return MixTerms("linear", a=(self.vera_lambda_d.unsqueeze(1) * vera_a).detach(),
                        b=(self.vera_lambda_b.unsqueeze(1) * vera_b).detach())

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.n_in}, out={self.n_out}"



def _shape(module: nn.Module, path: str) -> tuple[int, int, bool]:
    """(in, out, transposed) of a layer VeRA can adapt; ``ConfigError`` for any other."""
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out), True
    if isinstance(module, nn.Linear):  # in/out features, not weight.shape: a 4-bit weight is packed
        return module.in_features, module.out_features, False
    raise ConfigError(f"VeRA cannot adapt {path!r} of type {type(module).__name__}; supported: {SUPPORTED}")


def _check_reuse(shared: VeraProjections, config: VeraConfig, name: str, n_in: int, n_out: int) -> None:
    """A later VeRA adapter shares the projections in place (HF PEFT's rules); nothing changes on failure."""
    users = ", ".join(repr(n) for n in shared.users)
    why = f"(every VeRA adapter of a model shares the projections of {users})"
    for field, have in (("projection_prng_key", shared.projection_prng_key),
                        ("save_projection", shared.save_projection), ("r", shared.r)):
        if getattr(config, field) != have:
            raise ConfigError(f"adapter {name!r}: {field}: expected {have!r} {why}, found {getattr(config, field)!r}")
    have_in, have_out = shared.vera_A.shape[1], shared.vera_B.shape[0]
    if n_in > have_in or n_out > have_out:
        raise ConfigError(
            f"adapter {name!r}: its largest layers take {n_in} inputs and give {n_out} outputs, but the shared VeRA "
            f"projections of {users} are sized for {have_in} and {have_out}; add the adapter with the largest "
            "layers first"
        )
    if not config.save_projection and (n_in, n_out) != (have_in, have_out):
        warnings.warn(
            f"VeRA adapter {name!r} uses the projections of {users}, sized for larger layers ({have_in} in, "
            f"{have_out} out) than its own ({n_in}, {n_out}); with save_projection=False its file reproduces it "
            "only when loaded beside such an adapter", PeftkitWarning, stacklevel=5)


def build_units(model: nn.Module, config: VeraConfig, name: str,
                targets: list[tuple[str, nn.Module]]) -> list[VeraLinear]:
    """Create (first VeRA adapter) or reuse the shared projections, then one unit per target."""
    shapes = [_shape(module, path) for path, module in targets]  # a refused layer: nothing changed yet
    n_in, n_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    shared = model._modules.get(ATTR)
    if shared is not None:
        if not isinstance(shared, VeraProjections):
            raise ConfigError(f"VeRA keeps its shared projections at {type(model).__name__}.{ATTR}, which holds "
                              f"a {type(shared).__name__} already")
        _check_reuse(shared, config, name, n_in, n_out)
        shared.users.append(name)
    else:
        if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            raise ConfigError(f"VeRA adds its shared projections to the model as a child module ({ATTR}), which a "
                              f"{type(model).__name__} would run or list as one of its layers; wrap it in a module "
                              "with its own forward")
        if hasattr(model, ATTR):
            raise ConfigError(f"VeRA keeps its shared projections at {type(model).__name__}.{ATTR}, an attribute "
                              "the model has already")
        factory = adapter_factory(targets[0][1])
        vera_a, vera_b = make_projections(config.r, n_in, n_out, config.projection_prng_key)
        shared = VeraProjections(vera_a.to(**factory), vera_b.to(**factory), config.projection_prng_key,
                                 config.save_projection)
        shared.users.append(name)  # before it is installed: a failure from here on is rolled back whole
        model.add_module(ATTR, shared)
    # The layout is the layer's (HF PEFT sets the field so too; with mixed types, the last target's).
    config.fan_in_fan_out = shapes[-1][2]
    return [VeraLinear(shared, n_in_, n_out_, transposed, config.r, config.vera_dropout, config.init_weights,
                       config.d_initial, adapter_factory(module))
            for (n_in_, n_out_, transposed), (_, module) in zip(shapes, targets)]


# Defaults when target_modules is None, per transformers model_type: LoRA's (the attention
# query and value projections, or the fused one; HF PEFT's VeRA table is LoRA's too).
DEFAULT_TARGETS = architectures.table(architectures.lora_targets)


def _cli_config(values: dict[str, Any]) -> VeraConfig:
    return VeraConfig(r=values["r"], vera_dropout=values["dropout"], target_modules=values["targets"])


# The trainer's defaults: r = 256 (HF PEFT's default and the paper's order of rank: VeRA's parameters
# grow with r only through λ_d), no dropout (HF PEFT's default; 0.05 made no difference below), and the
# learning rate. Each vector scales frozen random directions, and λ_b starts at zero, so VeRA needs a
# far larger step than LoRA. On the bundled demo (MiniLM, r=256, 30 steps; eval loss from 1.09,
# seeds 0 / 1): 5e-3 left 0.90 (seed 0), 1e-2 0.64, 2e-2 0.19 / 0.20, 5e-2 0.011 / 0.033 (accuracy
# 1.0 / 0.99), 1e-1 0.004 / 0.002, 2e-1 0.040 (worse again); LoRA's default run reaches 0.54. 5e-2 is
# the best step with a margin of four below the one that degrades.
CLI_DEFAULTS = {"lr": 5e-2, "r": 256, "dropout": 0.0}

register(Method(
    "VERA", VeraConfig, build_units=build_units, default_targets=DEFAULT_TARGETS, mergeable=True,
    identity_at_init=True,
    cli=(CliMethod("vera", "VeRA: trained scaling vectors over shared frozen random projections "
                   "(default: the attention layers, r=256)", _cli_config, ("r", "dropout", "targets"),
                   CLI_DEFAULTS),),
))
