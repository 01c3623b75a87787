"""EVA — Explained Variance Adaptation: LoRA's A initialised from the data.

"One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation" (Paischer,
Hauzenberger, Schmied, Alkin, Deisenroth, Hochreiter, 2024, arXiv:2410.07170); HF PEFT's
``init_lora_weights="eva"`` with ``EvaConfig`` and ``initialize_lora_eva_weights``.

For every LoRA layer EVA can initialise (``nn.Linear`` and GPT-2's ``Conv1D``; HF PEFT leaves
Conv and Embedding layers out too), the inputs the layer receives on a few batches are collected
(padding left out through the ``attention_mask``; with ``use_label_mask`` also the positions whose
token-level ``labels`` are ``label_mask_value``), and their principal directions computed:

- **A** = the top right-singular vectors of the centred input matrix X − x̄ (PCA: the rows are
  unit vectors, sorted by singular value, the sign fixed so that each row's largest entry is
  positive); with ``whiten`` each row is divided by the square root of its singular value.
  B starts at zero, so the model still equals the base at init.
- **Ranks**: each layer may take up to ``round(r·rho)`` components; the budget is the sum of the
  layers' ranks. All layers' explained-variance ratios (σᵢ² / total variance of that layer's
  inputs) are pooled and the budget's largest ones kept, so a layer's new rank is how many of
  its components made it (0 removes the layer from the adapter). Ties go to the earlier layer.
  With ``adjust_scaling_factors`` a layer whose rank changed from r to r' gets
  ``alpha · r'/r``, keeping its scaling alpha/r.
- **Convergence** (``tau``): after each batch every layer's components are recomputed; a
  component has converged when its cosine similarity with the previous batch's is ≥ tau.
  Batches are drawn (the loader cycled) until, for every layer, all the components its current
  rank needs have converged; a layer stops collecting once converged.

Where HF PEFT runs an incremental PCA with a randomized low-rank SVD on each batch (an
approximation of the PCA of everything seen, truncated to the kept components), peftkit keeps
each distinct input's exact running mean and scatter matrix Σ(x − x̄)(x − x̄)ᵀ in float64
(Chan's pairwise update) and takes its eigenvectors: A is *exactly* the top right-singular
vectors of all the rows collected so far. The price is memory: d² float64 numbers per distinct
layer input of width d, held until EVA finishes — 128 MiB for d = 4096. Layers fed the same
tensor (q/k/v) share one: found by a fingerprint of the first batch's inputs and checked again
on every batch (a layer whose input stops matching gets statistics of its own from that batch on).

The result is an ordinary LoRA adapter: ``target_modules`` the layers kept, ``rank_pattern`` /
``alpha_pattern`` the new ranks and alphas, ``init_lora_weights: "eva"`` and ``eva_config`` in
the file as HF PEFT writes them; it loads in HF PEFT as is.

``peftkit train --init eva`` runs EVA on the training batches in the first epoch's order
(every process on the same batches, rank 0's result used); ``--resume`` rebuilds the adapter
from the checkpoint's file instead of recomputing it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from .errors import ConfigError, PeftkitWarning


@dataclass
class EvaConfig:
    """HF PEFT's ``EvaConfig``: the same fields, defaults and meaning."""

    rho: float = 2.0  # a layer's rank may grow to round(r·rho); 1: no redistribution
    tau: float = 0.99  # cosine similarity of consecutive components that counts as converged
    use_label_mask: bool = True  # leave out positions whose labels are label_mask_value
    label_mask_value: int = -100
    whiten: bool = False  # divide A's rows by the square roots of their singular values
    adjust_scaling_factors: bool = True  # alpha · r'/r where a layer's rank changed to r'

    def __post_init__(self) -> None:
        for name in ("rho", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"eva_config.{name}: expected a number, found {value!r}")
        if self.rho < 1.0:
            raise ConfigError(f"eva_config.rho: expected a number >= 1, found {self.rho!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"eva_config.tau: expected a number in [0, 1], found {self.tau!r}")
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"eva_config.{name}: expected true or false, found {getattr(self, name)!r}")
        if isinstance(self.label_mask_value, bool) or not isinstance(self.label_mask_value, int):
            raise ConfigError(f"eva_config.label_mask_value: expected an integer, found {self.label_mask_value!r}")


EVA_FIELDS = tuple(f.name for f in dataclasses.fields(EvaConfig))


def normalize_eva_config(value: Any, init: Any) -> dict[str, Any] | None:
    """``LoraConfig.eva_config`` as stored: a dict of every ``EvaConfig`` field (from a dict, a
    peftkit or HF ``EvaConfig``), the defaults when ``init`` is ``"eva"`` and none is given, or None."""
    if value is None:
        return dataclasses.asdict(EvaConfig()) if init == "eva" else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if not isinstance(value, Mapping):
        raise ConfigError(f"eva_config: expected a mapping of {', '.join(EVA_FIELDS)}, found {value!r}")
    unknown = sorted(set(value) - set(EVA_FIELDS))
    if unknown:
        raise ConfigError(f"eva_config: unknown field {unknown[0]!r}; known: {', '.join(EVA_FIELDS)}")
    return dataclasses.asdict(EvaConfig(**dict(value)))


# -- the statistics ---------------------------------------------------------------------------


class _Moments:
    """The running mean and scatter matrix (float64) of the rows of one layer input."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(dim=0)
        xc = x - mb
        m2b = xc.t() @ xc
        if self.n == 0:
            self.mean, self.m2 = mb, m2b
        else:
            total = self.n + nb
            delta = mb - self.mean
            self.m2 += m2b + torch.outer(delta, delta) * (self.n * nb / total)
            self.mean += delta * (nb / total)
        self.n += nb

    def principal(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(components (k, d) float64, singular values (k,), explained-variance ratios (k,))."""
        assert self.m2 is not None
        values, vectors = torch.linalg.eigh(self.m2)  # ascending
        values = values.flip(0)[:k].clamp_min(0.0)
        comps = vectors.flip(1)[:, :k].t().contiguous()
        top = comps.abs().argmax(dim=1)  # sign: each row's largest entry positive (deterministic)
        signs = torch.sign(comps[torch.arange(comps.shape[0], device=comps.device), top])
        comps *= torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(1)
        total = torch.trace(self.m2).clamp_min(torch.finfo(torch.float64).tiny)
        return comps, values.sqrt(), values / total


@dataclass
class _Group:
    """The layers fed one input tensor: their shared statistics and convergence."""

    members: list[str]
    k: int  # components kept: the largest max rank of its members
    moments: _Moments = dataclasses.field(default_factory=_Moments)
    comps: torch.Tensor | None = None
    singular: torch.Tensor | None = None
    ratio: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    done: bool = False

    def refresh(self, tau: float) -> None:
        if self.moments.n == 0:
            return
        comps, singular, ratio = self.moments.principal(self.k)
        if self.comps is not None and self.comps.shape == comps.shape:
            self.converged = (comps * self.comps).sum(dim=1) >= tau
        else:
            self.converged = torch.zeros(comps.shape[0], dtype=torch.bool, device=comps.device)
        self.comps, self.singular, self.ratio = comps, singular, ratio


# -- inputs -----------------------------------------------------------------------------------


def token_mask(batch: Mapping[str, Any], eva: EvaConfig) -> torch.Tensor | None:
    """(B, T) bool: the positions whose layer inputs EVA uses; None: every row of every input.

    The ``attention_mask`` (when 2-D: a packed batch's 4-D mask does not say which positions are
    padding) and, with ``use_label_mask``, ``labels != label_mask_value`` where ``labels`` is per
    token (a classifier's (B,) labels are not)."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return None
    attention = batch.get("attention_mask")
    mask = attention.bool() if isinstance(attention, torch.Tensor) and attention.shape == ids.shape \
        else torch.ones_like(ids, dtype=torch.bool)
    labels = batch.get("labels")
    if eva.use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
        mask = mask & (labels != eva.label_mask_value)
    return mask


def layer_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer's input as (rows, features): the masked positions when its leading dimensions are
    the batch's (B, T), else every row."""
    if mask is not None and x.ndim >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)].reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _forward_dict(model: nn.Module, batch: Any) -> Any:
    return model(**batch)


def _fingerprint(x: torch.Tensor, probes: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """Values that tell two layer inputs apart (two random projections in float64)."""
    flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    d = flat.shape[1]
    if d not in probes:
        g = torch.Generator().manual_seed(1234 + d)
        probes[d] = (torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64))
    p1, p2 = (p.to(flat.device) for p in probes[d])
    rows = torch.arange(flat.shape[0], device=flat.device, dtype=torch.float64) + 1
    return (tuple(x.shape), float((flat @ p1).sum()), float(((flat @ p2) * rows).sum()))


# -- EVA ----------------------------------------------------------------------------------------


def _eva_targets(model: nn.Module, adapter_name: str):
    from .layer import AdapterLayer
    from .methods.lora import LoraConfig, LoraLinear
    from .state import check_name, get_state, hosts

    state = get_state(model)
    config = check_name(state, adapter_name)
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"EVA initialises LoRA adapters; {adapter_name!r} is {config.peft_type}")
    if config.init_lora_weights != "eva":
        raise ConfigError(f"EVA needs LoraConfig(init_lora_weights='eva'); adapter {adapter_name!r} has "
                          f"init_lora_weights={config.init_lora_weights!r}")
    targets, others = [], []
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer) and adapter_name in host.adapters:
            unit = host.adapters[adapter_name]
            (targets if isinstance(unit, LoraLinear) else others).append((path, host, unit))
    return config, EvaConfig(**(config.eva_config or {})), targets, others


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, adapter_name: str = "default",
                       forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                       token_mask_fn: Callable[[Any], torch.Tensor | None] | None = None,
                       max_batches: int | None = None, show_progress_bar: bool = False) -> dict[str, torch.Tensor]:
    """EVA's A for every layer it initialises: ``{module path: (rank, in_features)}`` (float32;
    rank 0 for a layer that gets none). ``model`` holds the LoRA adapter ``adapter_name``
    (``init_lora_weights="eva"``); the forward passes run in eval mode with the adapters disabled.

    ``forward_fn(model, batch)`` runs a batch (default ``model(**batch)``; the batch is moved to
    the model's device first); ``token_mask_fn(batch)`` gives the (B, T) positions to use
    (default ``token_mask``: attention mask and label mask). ``max_batches`` bounds the number of
    forward passes (default: until converged, like HF PEFT); when it is reached first, EVA uses
    what it has and warns."""
    from .adapters import disabled

    config, eva, targets, _ = _eva_targets(model, adapter_name)
    if not targets:
        raise ConfigError(f"adapter {adapter_name!r} adapts no Linear or Conv1D layer: EVA has nothing to initialise")
    try:
        empty = len(dataloader) == 0  # type: ignore[arg-type]
    except TypeError:
        empty = False
    if empty:
        raise ConfigError("EVA needs data: the dataloader is empty")
    forward_fn = forward_fn or _forward_dict
    mask_fn = token_mask_fn or (lambda batch: token_mask(batch, eva))
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    max_rank = {path: min(round(unit.r * eva.rho), unit.lora_A.shape[1]) for path, _, unit in targets}
    budget = sum(unit.r for _, _, unit in targets)
    order = [path for path, _, _ in targets]

    groups: list[_Group] = []
    group_of: dict[str, _Group] = {}
    seen: dict[tuple, _Group] = {}
    probes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    current: dict[str, Any] = {"mask": None, "first": True, "prints": {}}

    def hook(path: str):
        def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if current["first"] and path not in group_of:
                key = _fingerprint(x, probes)
                if x.numel() == 0 or key[1] == key[2] == 0.0:
                    key = (*key, path)  # empty or zero inputs: no evidence of a shared input
                group = seen.get(key)
                if group is None:
                    group = seen[key] = _Group([path], max_rank[path])
                    groups.append(group)
                else:
                    group.members.append(path)
                    group.k = max(group.k, max_rank[path])
                group_of[path] = group
            group = group_of.get(path)
            if group is None or group.done:
                return
            if len(group.members) > 1 and not current["first"]:  # still the group's input?
                prints = current["prints"]
                prints[path] = _fingerprint(x, probes)
                leader = group.members[0]
                if path != leader and leader in prints and prints[leader] != prints[path]:
                    group = split(group, [path])
            if group.members[0] == path:
                group.moments.add(layer_rows(x, current["mask"]))
        return fn

    def split(group: _Group, stray: list[str]) -> _Group:
        """Layers grouped on the first batch whose input later differs get a group of their own."""
        group.members = [m for m in group.members if m not in stray]
        new = _Group(list(stray), max(max_rank[m] for m in stray))
        groups.append(new)
        group_of.update({m: new for m in stray})
        return new

    def check_shared() -> None:
        """After a forward pass: the same check for layers called before their group's first
        layer (these collect from the next batch on)."""
        prints = current["prints"]
        for g in list(groups):
            if len(g.members) > 1 and g.members[0] in prints:
                stray = [m for m in g.members[1:] if m in prints and prints[m] != prints[g.members[0]]]
                if stray:
                    split(g, stray)
        prints.clear()

    training = model.training
    handles = [host.register_forward_pre_hook(hook(path), with_kwargs=True) for path, host, _ in targets]
    rank: dict[str, int] = dict(max_rank)
    batches = 0
    bar = None
    if show_progress_bar:
        from tqdm import tqdm

        bar = tqdm(desc="EVA", unit="batch", leave=False)
    try:
        model.eval()
        with disabled(model):
            finished = False
            while not finished:
                drew = False
                for batch in dataloader:
                    drew = True
                    if groups and all(g.done for g in groups):
                        finished = True
                        break
                    if max_batches is not None and batches >= max_batches:
                        open_ = [m for g in groups if not g.done for m in g.members]
                        warnings.warn(f"EVA: {len(open_)} layer(s) had not converged after {batches} batches "
                                      f"(tau {eva.tau}); their A is the PCA of the inputs collected so far "
                                      f"(first: {open_[0]})", PeftkitWarning, stacklevel=3)
                        finished = True
                        break
                    batch = _to(batch, device)
                    current["mask"] = mask_fn(batch)
                    forward_fn(model, batch)
                    batches += 1
                    if current["first"]:
                        missing = [p for p in order if p not in group_of]
                        if missing:
                            raise ConfigError(f"EVA: the forward pass did not reach {len(missing)} adapted "
                                              f"layer(s), e.g. {missing[0]!r}")
                        current["first"] = False
                    else:
                        check_shared()
                    for g in groups:
                        if not g.done:
                            g.refresh(eva.tau)
                    if any(g.comps is None for g in groups):
                        continue  # a layer has seen no rows yet (every position masked)
                    rank = _distribute(groups, group_of, order, max_rank, budget)
                    for g in groups:
                        need = max(rank[m] for m in g.members)
                        g.done = bool(g.converged[:need].all())
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"{sum(len(g.members) for g in groups if g.done)}/{len(order)} converged")
                if not drew:
                    raise ConfigError("EVA needs data: the dataloader gave no batch")
    finally:
        for h in handles:
            h.remove()
        model.train(training)
        if bar is not None:
            bar.close()
    if any(g.comps is None for g in groups):
        empty_layer = next(g.members[0] for g in groups if g.comps is None)
        raise ConfigError(f"EVA: no input rows reached {empty_layer!r} (every position masked out?)")
    out = {}
    for path, _, unit in targets:
        g = group_of[path]
        a = g.comps[: rank[path]].clone()
        if eva.whiten:
            a = a / g.singular[: rank[path]].sqrt().clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
        out[path] = a.to(device=unit.lora_A.device, dtype=torch.float32)
    return out


def _distribute(groups: list[_Group], group_of: dict[str, _Group], order: list[str], max_rank: dict[str, int],
                budget: int) -> dict[str, int]:
    """Each layer's rank: how many of its explained-variance ratios are among the ``budget``
    largest of every layer's (its first ``max_rank`` of its group's); ties to the earlier layer."""
    owners, values = [], []
    for path in order:
        g = group_of[path]
        k = min(g.k, g.ratio.shape[0])
        for value in g.ratio[:k].tolist():
            owners.append(path)
            values.append(value)
    picked = sorted(range(len(values)), key=lambda i: -values[i])[:budget]  # stable: earlier layer first
    counts = {path: 0 for path in order}
    for i in picked:
        counts[owners[i]] += 1
    return counts


def load_eva_state_dict(model: nn.Module, eva_state_dict: Mapping[str, torch.Tensor],
                        adapter_name: str = "default") -> nn.Module:
    """Rebuild adapter ``adapter_name`` with EVA's ranks and A (``get_eva_state_dict``'s result):
    ``rank_pattern`` / ``alpha_pattern`` as EVA decided, layers of rank 0 removed, B zero; the
    layers EVA does not initialise keep their rank and LoRA's default init."""
    from .targeting import pattern_value

    config, eva, targets, others = _eva_targets(model, adapter_name)
    paths = {path for path, _, _ in targets}
    unknown = sorted(set(eva_state_dict) - paths)
    if unknown:
        raise ConfigError(f"EVA state: {unknown[0]!r} is not a layer adapter {adapter_name!r} lets EVA initialise")
    keep, rank_pattern, alpha_pattern, missing = [], {}, {}, []
    for path, _, unit in sorted(targets + others, key=lambda t: t[0]):
        r = unit.r
        alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
        if path in eva_state_dict:
            new_rank = int(eva_state_dict[path].shape[0])
            if eva_state_dict[path].ndim != 2 or eva_state_dict[path].shape[1] != unit.lora_A.shape[1]:
                raise ConfigError(f"EVA state: {path!r} has shape {tuple(eva_state_dict[path].shape)}; expected "
                                  f"(rank, {unit.lora_A.shape[1]})")
            if new_rank == 0:
                continue
            if new_rank != r and eva.adjust_scaling_factors:
                alpha = alpha * new_rank / r
        else:
            new_rank = r
            missing.append(path)
        keep.append(path)
        if new_rank != config.r:
            rank_pattern[path] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    if not keep:
        raise ConfigError("EVA gave every layer rank 0")
    if missing and eva_state_dict:
        warnings.warn(f"EVA: {len(missing)} layer(s) keep LoRA's default init (EVA initialises Linear and "
                      f"Conv1D layers only), e.g. {missing[0]!r}", PeftkitWarning, stacklevel=2)
    new_config = dataclasses.replace(config, target_modules=keep, rank_pattern=rank_pattern,
                                     alpha_pattern=alpha_pattern)
    _rebuild(model, adapter_name, new_config)
    from .layer import AdapterLayer
    from .state import hosts

    with torch.no_grad():
        for path, host in hosts(model):
            if isinstance(host, AdapterLayer) and adapter_name in host.adapters and path in eva_state_dict:
                unit = host.adapters[adapter_name]
                unit.lora_A.copy_(eva_state_dict[path].to(unit.lora_A))
    return model


def _rebuild(model: nn.Module, name: str, config: Any) -> None:
    """Replace adapter ``name`` by a fresh one built from ``config`` (same activity)."""
    from .adapters import delete, set_active
    from .inject import apply
    from .state import get_state, has_adapters

    active = list(get_state(model).active)
    delete(model, name)
    apply(model, config, name)
    if active != [name] and has_adapters(model):
        set_active(model, active)


def eva_layout(config: Any) -> dict[str, Any]:
    """What EVA changed in a config (for rebuilding an adapter from a saved file's config)."""
    return {"target_modules": config.target_modules, "rank_pattern": config.rank_pattern,
            "alpha_pattern": config.alpha_pattern}


def rebuild_from_file(model: nn.Module, directory: Any, adapter_name: str = "default") -> nn.Module:
    """Give adapter ``adapter_name`` the layout (targets, ranks, alphas) and the tensors of the
    EVA-initialised adapter saved in ``directory`` (``peftkit train --resume``)."""
    from . import io
    from .state import get_state

    saved = io.read_config(directory)
    config = get_state(model).configs[adapter_name]
    _rebuild(model, adapter_name, dataclasses.replace(config, **eva_layout(saved)))
    tensors = io.read_tensors(directory)
    live = io.adapter_tensors(model, adapter_name)
    if set(tensors) != set(live):
        extra = sorted(set(tensors) ^ set(live))
        raise ConfigError(f"{directory}: the adapter's tensors do not match the rebuilt EVA layout ({extra[0]})")
    with torch.no_grad():
        for key, tensor in tensors.items():
            live[key].copy_(tensor.to(live[key]))
    return model


@torch.no_grad()
def initialize_eva(model: nn.Module, dataloader: Iterable | None = None, adapter_name: str = "default",
                   eva_state_dict: Mapping[str, torch.Tensor] | None = None,
                   forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                   token_mask_fn: Callable[[Any], torch.Tensor | None] | None = None,
                   max_batches: int | None = None, show_progress_bar: bool = False) -> nn.Module:
    """EVA-initialise LoRA adapter ``adapter_name`` (``LoraConfig(init_lora_weights="eva")``)
    from ``dataloader``'s batches (or a given ``eva_state_dict``): ``get_eva_state_dict`` then
    ``load_eva_state_dict``. Returns ``model``."""
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("initialize_eva needs a dataloader (or an eva_state_dict)")
        eva_state_dict = get_eva_state_dict(model, dataloader, adapter_name, forward_fn=forward_fn,
                                            token_mask_fn=token_mask_fn, max_batches=max_batches,
                                            show_progress_bar=show_progress_bar)
    return load_eva_state_dict(model, eva_state_dict, adapter_name)


def initialize_lora_eva_weights(model: nn.Module, dataloader: Iterable | None = None,
                                eva_state_dict: Mapping[str, torch.Tensor] | None = None,
                                forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                                adapter_name: str = "default", show_progress_bar: bool = False,
                                **kwargs: Any) -> nn.Module:
    """HF PEFT's name and argument order for ``initialize_eva`` (HF's ``prepare_model_inputs_fn``
    / ``prepare_layer_inputs_fn`` have no counterpart: pass ``token_mask_fn``)."""
    for name in ("prepare_model_inputs_fn", "prepare_layer_inputs_fn", "gather_distributed_inputs"):
        if kwargs.pop(name, None) not in (None, True):
            raise ConfigError(f"initialize_lora_eva_weights: {name} is not supported by peftkit; "
                              "use token_mask_fn=... (initialize_eva)")
    return initialize_eva(model, dataloader, adapter_name, eva_state_dict=eva_state_dict, forward_fn=forward_fn,
                          show_progress_bar=show_progress_bar, **kwargs)
