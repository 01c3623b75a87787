"""Serving many adapters in one batch: ``model(..., adapter_names=names)``, HF PEFT's convention.

Row i of the batch runs with adapter ``names[i]`` alone, or with none for ``"__base__"``; the
active set is not consulted. ``model.generate(..., adapter_names=names)`` does the same for
every step of a generation (the names follow the rows when ``generate`` repeats them for
``num_beams`` / ``num_return_sequences``). Inference only: eval mode, nothing merged, adapters
not disabled; anything else, or a mix that cannot run, is a ``ConfigError`` before any work.

One pass, no loop over adapters in a layer. Each unit describes its effect on a row as
``MixTerms`` (unit.py): ``out = (base(x ⊙ in_scale) + low-rank(x)) ⊙ out_scale + out_shift``.
For the adapters of a batch, a layer stacks those terms once into tensors indexed by *slot*
(0 = no adapter: zero low-rank pair, unit scales) and caches them until a source tensor
changes (``_version``) — that covers LoRA of any rank and scaling (zero-padded to the largest),
rsLoRA, DoRA (its magnitude ratio is an output scale, its bias correction a shift), AdaLoRA,
VeRA and (IA)³, on Linear, Conv1D, Embedding and Conv2d layers. The low-rank term runs one of
two ways, chosen per call from the shapes (``path``):

- ``grouped``: rows gathered by adapter into (n, G·T, in), G the largest group (short groups
  padded), two batched matmuls against the n stacked pairs, results added back by row index.
  Reads each adapter once: the choice at decoding (T = 1), where the input is small.
- ``per_row``: each row's pair gathered, (B, r, in), and two batched matmuls; no copy of the
  input. The choice at prefill, where copying the input would cost more than the pairs.

Input methods (prompt tuning, P-tuning, prefix tuning) mix when every row names one of them,
all of one kind and with the same ``num_virtual_tokens``: each row gets its own prompt.
``modules_to_save`` copies (heads) run once per adapter on its rows, the one loop here, once
per call rather than per layer.

How it hooks in: ``state`` installs the model's forward pre-hook and ``generate`` wrapper; a
call with names goes to ``begin`` (outside ``torch.compile``'s graph: the names are Python
strings), which builds the ``Plan`` (row → slot tensors) and sets each host's ``_mix``; the
forward hook calls ``end`` to clear them. Inside the graph the layers only read tensors, so
batches with the same adapters and group sizes reuse a compiled graph.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .layer import AdapterLayer, SavedModule
from .prompting import PromptHost
from .targeting import logical_modules
from .unit import MixTerms, autocast_on

BASE = "__base__"
FORCE_PATH: str | None = None  # "grouped" or "per_row": tests run both paths on the same batch
CACHE_SIZE = 4  # stacked terms kept per layer (one per recent set of adapters)
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values")


class Router:
    """One per model (in its ``PeftState``): the names of a running ``generate`` and this call's plan."""

    def __init__(self) -> None:
        self.generating: list[str] | None = None
        self.plan: Plan | None = None
        self._hosts: tuple[Any, list[tuple[str, nn.Module]]] | None = None
        self._last: tuple[Any, Any] | None = None  # the last call's names and (plan, mixes)


class Plan:
    """Which slot each row of one call uses. Slot 0 is the base model, slot k ≥ 1 adapter
    ``slots[k - 1]`` (sorted, so one set of adapters is one cache key)."""

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.slots = tuple(sorted({n for n in names if n != BASE}))
        index = {n: k + 1 for k, n in enumerate(self.slots)}
        row_slot = [index.get(n, 0) for n in names]
        self.batch = len(names)
        self.row_slot = torch.tensor(row_slot, dtype=torch.long, device=device)
        groups = [[i for i, s in enumerate(row_slot) if s == k] for k in range(len(self.slots) + 1)]
        self.rows_of = [torch.tensor(g, dtype=torch.long, device=device) if g else None for g in groups]
        adapter_groups = groups[1:]
        self.group = max((len(g) for g in adapter_groups), default=0)
        gather = [g[j] if j < len(g) else g[0] for g in adapter_groups for j in range(self.group)]
        self.gather = torch.tensor(gather, dtype=torch.long, device=device)
        self.contiguous = gather == list(range(self.batch))  # grouped already: no copy, no padding
        padded = any(len(g) < self.group for g in adapter_groups)
        self.valid_pos = torch.tensor([k * self.group + j for k, g in enumerate(adapter_groups) for j in range(len(g))],
                                      dtype=torch.long, device=device) if padded else None
        self.valid_rows = torch.tensor([i for g in adapter_groups for i in g], dtype=torch.long, device=device) \
            if padded else self.gather
        self.adapter_rows = sum(len(g) for g in adapter_groups)


# -- what each host runs -------------------------------------------------------------------------------


class BaseOnly:
    """A host none of whose adapters is in the batch: the base layer alone."""

    def run(self, layer: AdapterLayer, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        return layer.base_layer(x, *args, **kwargs)


BASE_ONLY = BaseOnly()


def _row_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, F) per-row vectors shaped to broadcast over (B, ..., F)."""
    return values.view(values.shape[0], *([1] * (like.dim() - 2)), values.shape[1]).to(like.dtype)


def _stack(tensors: list[torch.Tensor | None], fill: float, like: torch.Tensor) -> torch.Tensor:
    """Slot 0 (the base) and every slot without a term get ``fill``."""
    out = torch.full((len(tensors) + 1, *like.shape), fill, dtype=like.dtype, device=like.device)
    for k, t in enumerate(tensors, start=1):
        if t is not None:
            out[k].copy_(t)
    return out


class LayerMix:
    """The stacked terms of one layer for one set of adapters, and the batched forward."""

    def __init__(self, router: Router, terms: list[MixTerms | None]) -> None:
        self.router = router
        present = [t for t in terms if t is not None]
        pairs = [t for t in present if t.a is not None]
        kinds = {t.kind for t in pairs}
        assert len(kinds) <= 1, kinds  # one layer has one type
        self.kind = kinds.pop() if kinds else "linear"
        with torch.no_grad():
            self.in_scale = self._vectors(terms, "in_scale", 1.0)
            self.out_scale = self._vectors(terms, "out_scale", 1.0)
            self.out_shift = self._vectors(terms, "out_shift", 0.0)
            if self.out_shift is not None and self.out_scale is None:
                self.out_scale = torch.ones_like(self.out_shift)
            self.a = self.bt = None
            if pairs:
                self._stack_pairs(terms, pairs)

    @staticmethod
    def _vectors(terms: list[MixTerms | None], field: str, fill: float) -> torch.Tensor | None:
        values = [getattr(t, field) if t is not None else None for t in terms]
        like = next((v for v in values if v is not None), None)
        return None if like is None else _stack(values, fill, like)

    def _stack_pairs(self, terms: list[MixTerms | None], pairs: list[MixTerms]) -> None:
        rank = max(t.a.shape[0] for t in pairs)
        first = pairs[0]
        n = len(terms) + 1
        a = first.a.new_zeros((n, rank, *first.a.shape[1:]))
        b = first.b.new_zeros((n, first.b.shape[0], rank))
        for k, t in enumerate(terms, start=1):
            if t is not None and t.a is not None:
                r = t.a.shape[0]
                a[k, :r].copy_(t.a)
                b[k, :, :r].copy_(t.b)
        self.conv = first.conv
        self.rank = rank
        # laid out for the batched matmuls: B as (slots, r, out); A per kind, linear (slots, in, r),
        # embedding (slots·num, r) (looked up per slot and id), conv2d (slots, r, in, kh, kw)
        self.bt = b.transpose(1, 2).contiguous()
        if self.kind == "linear":
            self.a = a.transpose(1, 2).contiguous()
        elif self.kind == "embedding":
            self.a = a.transpose(1, 2).reshape(-1, rank)
        else:
            self.a = a

    def run(self, layer: AdapterLayer, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        plan = self.router.plan
        rows = plan.row_slot
        base_x = x if self.in_scale is None else x * _row_view(self.in_scale.index_select(0, rows), x)
        out = layer.base_layer(base_x, *args, **kwargs)
        if self.a is not None:
            if self.kind == "linear":
                out = self._linear(plan, x, out)
            elif self.kind == "embedding":
                out = self._embedding(plan, x, out)
            else:
                out = self._conv2d(plan, x, out)
        if self.out_scale is not None:
            out = out * _row_view(self.out_scale.index_select(0, rows), out)
            if self.out_shift is not None:
                out = out + _row_view(self.out_shift.index_select(0, rows), out)
        return out

    def path(self, plan: Plan, tokens: int, n_in: int, n_out: int) -> str:
        """``grouped`` or ``per_row``, whichever moves fewer elements besides the matmuls."""
        if FORCE_PATH is not None:
            return FORCE_PATH
        per_row = plan.batch * self.rank * (n_in + n_out)  # the gathered pairs
        slots = len(plan.slots) * plan.group
        grouped = (slots - plan.adapter_rows) * tokens * self.rank * (n_in + n_out)  # padding's work
        if not plan.contiguous:
            grouped += slots * tokens * n_in + plan.adapter_rows * tokens * n_out  # gathered input, scattered output
        return "grouped" if grouped <= per_row else "per_row"

    def _linear(self, plan: Plan, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        batch = plan.batch
        x3 = x.reshape(batch, -1, x.shape[-1])
        if x3.dtype != self.a.dtype:
            x3 = x3.to(self.a.dtype)
        out3 = out.view(batch, -1, out.shape[-1])
        tokens = x3.shape[1]
        fused = (out.dtype == self.a.dtype and not torch.is_grad_enabled()  # add into the base output in place
                 and not autocast_on(out.device))  # (autocast casts no in-place op's operands)
        if self.path(plan, tokens, x3.shape[-1], out3.shape[-1]) == "per_row":
            bt = self.bt.index_select(0, plan.row_slot)  # (B, r, out)
            h = torch.bmm(x3, self.a.index_select(0, plan.row_slot))  # (B, T, r)
            if fused:
                return out3.baddbmm_(h, bt).view(out.shape)
            return (out3 + torch.bmm(h, bt).to(out.dtype)).view(out.shape)
        n, group = len(plan.slots), plan.group
        xg = x3 if plan.contiguous else x3.index_select(0, plan.gather)
        h = torch.bmm(xg.reshape(n, group * tokens, x3.shape[-1]), self.a[1:])  # (n, G·T, r)
        if plan.contiguous:
            out_g = out3.view(n, group * tokens, -1)
            if fused:
                return out_g.baddbmm_(h, self.bt[1:]).view(out.shape)
            return (out_g + torch.bmm(h, self.bt[1:]).to(out.dtype)).view(out.shape)
        delta = torch.bmm(h, self.bt[1:]).view(n * group, tokens, -1).to(out.dtype)
        if plan.valid_pos is not None:
            delta = delta.index_select(0, plan.valid_pos)
        if fused:
            return out3.index_add_(0, plan.valid_rows, delta).view(out.shape)
        return out3.index_add(0, plan.valid_rows, delta).view(out.shape)

    def _embedding(self, plan: Plan, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        batch = plan.batch
        num = self.a.shape[0] // (len(plan.slots) + 1)
        flat = (plan.row_slot.view(batch, 1) * num + ids.reshape(batch, -1)).view(-1)
        h = F.embedding(flat, self.a).view(batch, -1, self.rank)  # (B, T, r)
        delta = torch.bmm(h, self.bt.index_select(0, plan.row_slot))  # (B, T, dim)
        return out + delta.view(out.shape).to(out.dtype)

    def _conv2d(self, plan: Plan, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        stride, padding, dilation = self.conv
        slots, rank = self.a.shape[0], self.a.shape[1]
        h = F.conv2d(x.to(self.a.dtype), self.a.reshape(slots * rank, *self.a.shape[2:]),
                     stride=stride, padding=padding, dilation=dilation)  # every slot's filters: (B, slots·r, H, W)
        h = h.view(h.shape[0], slots, rank, *h.shape[2:])
        pick = plan.row_slot.view(-1, 1, 1, 1, 1).expand(-1, 1, rank, *h.shape[3:])
        h = h.gather(1, pick).squeeze(1)  # each row's own: (B, r, H, W)
        delta = torch.einsum("bro,brhw->bohw", self.bt.index_select(0, plan.row_slot), h)
        return out + delta.to(out.dtype)


class SavedMix:
    """A ``modules_to_save`` host in a mixed batch: each slot's copy (or the original) on its rows."""

    def __init__(self, router: Router, modules: list[nn.Module]) -> None:
        self.router = router
        self.modules = modules  # slot 0..n

    def run(self, args: tuple, kwargs: dict) -> Any:
        plan = self.router.plan
        used = [(rows, self.modules[k]) for k, rows in enumerate(plan.rows_of) if rows is not None]
        if len({id(m) for _, m in used}) == 1:
            return used[0][1](*args, **kwargs)
        out = None
        for rows, module in used:
            part = module(*_take(args, rows, plan.batch), **_take(kwargs, rows, plan.batch))
            if not isinstance(part, torch.Tensor):
                raise ConfigError(f"{type(module).__name__} returns {type(part).__name__}; a modules_to_save "
                                  "module in a mixed-adapter batch must return one tensor")
            if out is None:
                out = part.new_empty((plan.batch, *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out


def _take(values: Any, rows: torch.Tensor, batch: int) -> Any:
    """The rows of every tensor argument whose first dimension is the batch."""
    def one(v: Any) -> Any:
        return v.index_select(0, rows) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v
    if isinstance(values, dict):
        return {k: one(v) for k, v in values.items()}
    return tuple(one(v) for v in values)


class PromptMix:
    """An input-method host in a mixed batch: one prompt per row (``PromptHost.extend`` reads it)."""

    def __init__(self, router: Router, adapters: list[nn.Module] | None) -> None:
        self.router = router
        self.adapters = adapters  # slot 1..n; None: no prompt in this batch
        self.kind = adapters[0].kind if adapters else None
        self.tokens = adapters[0].num_virtual_tokens if adapters else 0

    def prompts(self) -> torch.Tensor:
        """(B, P, X): each row's prompt."""
        stacked = torch.stack([a.prompt() for a in self.adapters])
        return stacked.index_select(0, self.router.plan.row_slot - 1)


# -- building a call's plan ------------------------------------------------------------------------------


def _hosts(model: nn.Module, state: Any) -> list[tuple[str, nn.Module]]:
    key = tuple((n, len(t)) for n, t in state.targets.items()), tuple(state.configs)
    router = state.router
    if router._hosts is None or router._hosts[0] != key:
        found = [(path, m) for path, m in logical_modules(model)
                 if isinstance(m, (AdapterLayer, SavedModule, PromptHost))]
        router._hosts = (key, found)
    return router._hosts[1]


def _batch_size(args: tuple, kwargs: dict) -> int:
    for key in _BATCH_KEYS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim():
        return int(args[0].shape[0])
    raise ConfigError("adapter_names: cannot tell the batch size (no input_ids, inputs_embeds or pixel_values)")


def check_names(names: Any, state: Any, model: nn.Module, call: str) -> list[str]:
    """``adapter_names`` as a list of known names; ConfigError naming the problem otherwise."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{call}: adapter_names must be a list of adapter names, one per row, "
                          f"found {type(names).__name__}")
    if model.training:
        raise ConfigError(f"{call}: adapter_names= is for inference; the model is in training mode (call model.eval())")
    unknown = sorted({n for n in names if n != BASE and n not in state.configs})
    if unknown:
        known = ", ".join(repr(n) for n in state.configs)
        raise ConfigError(f"{call}: adapter_names: no adapter named {', '.join(map(repr, unknown))} "
                          f"(adapters: {known}; {BASE!r} for the base model)")
    return list(names)


def _expand(names: list[str], batch: int, generating: bool) -> list[str]:
    if len(names) == batch:
        return names
    if generating and batch % len(names) == 0:  # generate repeats each row for beams / return sequences
        repeat = batch // len(names)
        return [n for n in names for _ in range(repeat)]
    raise ConfigError(f"adapter_names has {len(names)} names for a batch of {batch} rows; give one name per row")


def begin(model: nn.Module, state: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Set up one forward call of a mixed batch; returns the call's arguments without the names."""
    router = state.router
    kwargs = dict(kwargs)
    given = kwargs.pop("adapter_names", None)
    call = f"{type(model).__name__}.forward"
    names = check_names(given, state, model, call) if given is not None else router.generating
    batch = _batch_size(args, kwargs)
    names = _expand(names, batch, given is None)
    device = next((v.device for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), torch.device("cpu"))
    key = (tuple(names), device)
    if router._last is not None and router._last[0] == key:
        plan, mixes = router._last[1]
        if given is not None:  # a new call: the adapters' tensors may have changed (within a generate they do not)
            mixes = [(host, _mix_for(host, path, plan, router)) for path, host in _hosts(model, state)]
    else:
        plan = Plan(names, device)
        _check_bases(plan, state)
        mixes = [(host, _mix_for(host, path, plan, router)) for path, host in _hosts(model, state)]
    router._last = (key, (plan, mixes))
    router.plan = plan
    for host, mix in mixes:
        host._mix = mix
    return args, kwargs


def _check_bases(plan: Plan, state: Any) -> None:
    """A loaded adapter whose init rewrote the base weights (PiSSA, OLoRA, LoftQ: the base holds a
    residual) serves only its own rows: every other row would run over that residual."""
    from .methods import lora_init

    rewritten = [n for n, c in state.configs.items() if lora_init.modifies_base(getattr(c, "init_lora_weights", None))]
    others = [n for n in plan.slots if n not in rewritten] + ([BASE] if plan.rows_of[0] is not None else [])
    if rewritten and (others or len(plan.slots) > 1):
        raise ConfigError(f"adapter_names=: adapter(s) {', '.join(map(repr, rewritten))} replaced the base weights "
                          f"by a residual (init_lora_weights {', '.join(repr(state.configs[n].init_lora_weights) for n in rewritten)}); "
                          f"rows of {', '.join(map(repr, others or plan.slots))} would run over it. Serve such an "
                          "adapter alone, or save it converted to a plain LoRA (peftkit.save(..., plain_lora=True)) "
                          "and load that")


def end(model: nn.Module, state: Any) -> None:
    router = state.router
    if router.plan is None:
        return
    router.plan = None
    for _, host in _hosts(model, state):
        host._mix = None


def _mix_for(host: nn.Module, path: str, plan: Plan, router: Router) -> Any:
    if isinstance(host, AdapterLayer):
        return _layer_mix(host, path, plan, router)
    if isinstance(host, SavedModule):
        if host.disabled:
            raise ConfigError("adapter_names= inside peftkit.disabled(model): the adapters are off")
        modules = [host.original_module, *(host.copies[n] if n in host.copies else host.original_module
                                           for n in plan.slots)]
        return SavedMix(router, modules)
    return _prompt_mix(host, plan, router)


def _layer_mix(host: AdapterLayer, path: str, plan: Plan, router: Router) -> Any:
    if host.merged:
        raise ConfigError(f"adapter_names=: adapter(s) {', '.join(map(repr, host.merged))} are merged into {path!r}; "
                          "call peftkit.unmerge(model) first")
    if host.disabled:
        raise ConfigError("adapter_names= inside peftkit.disabled(model): the adapters are off")
    present = host.adapters._modules  # the ModuleDict's own dict: no per-name module lookups
    units = [present.get(n) for n in plan.slots]
    if all(u is None for u in units):
        return BASE_ONLY
    sources = [(id(t), t._version) for u in units if u is not None for t in u.mix_sources()]
    cache = host.__dict__.setdefault("_mix_cache", {})
    hit = cache.get(plan.slots)
    if hit is not None and hit[0] == sources:
        return hit[1]
    terms = []
    for name, unit in zip(plan.slots, units):
        term = unit.mix_terms() if unit is not None else None
        if unit is not None and term is None:
            raise ConfigError(f"adapter {name!r} cannot serve rows of a mixed-adapter batch: its "
                              f"{type(unit).__name__} on {path!r} has no batched form (mixed batches take LoRA, "
                              "DoRA, AdaLoRA, VeRA, (IA)³, and prompt adapters of one kind and length)")
        terms.append(term)
    mix = LayerMix(router, terms)
    cache.pop(plan.slots, None)
    cache[plan.slots] = (sources, mix)
    while len(cache) > CACHE_SIZE:
        cache.pop(next(iter(cache)))
    return mix


def _prompt_mix(host: PromptHost, plan: Plan, router: Router) -> PromptMix:
    if host.disabled:
        raise ConfigError("adapter_names= inside peftkit.disabled(model): the adapters are off")
    prompts = [n for n in plan.slots if n in host.adapters]
    if not prompts:
        return PromptMix(router, None)
    others = [n for n in plan.slots if n not in host.adapters]
    if others or plan.rows_of[0] is not None:
        rows = [repr(n) for n in others] + ([repr(BASE)] if plan.rows_of[0] is not None else [])
        raise ConfigError(f"adapter_names=: prompt adapters ({', '.join(map(repr, prompts))}) cannot share a batch "
                          f"with rows of {', '.join(rows)}: their virtual tokens make the rows longer; "
                          "run them in separate batches")
    adapters = [host.adapters[n] for n in prompts]
    shapes = {(a.kind, a.num_virtual_tokens) for a in adapters}
    if len(shapes) > 1:
        found = ", ".join(f"{n!r}: {a.kind}, {a.num_virtual_tokens} tokens" for n, a in zip(prompts, adapters))
        raise ConfigError(f"adapter_names=: prompt adapters in one batch must be of one kind (virtual embeddings "
                          f"or prefixes) with the same num_virtual_tokens; found {found}")
    return PromptMix(router, adapters)
