"""Trainable token rows: ``LoraConfig(trainable_token_indices=...)``, HF PEFT's "trainable tokens".

Only the rows of chosen tokens of an embedding (typically tokens a tokenizer just added) are
trained; the file holds those rows, not the embedding matrix: for an embedding at ``path``,
``base_model.model.<path>.token_adapter.trainable_tokens_delta`` of shape (tokens, dim). Despite
HF's name the tensor holds the rows themselves (it starts as a copy of the base rows), and the
layer computes with them in place of the base rows.

- ``trainable_token_indices=[ids]``: the model's input embedding (``get_input_embeddings()``,
  else a module named ``embed_tokens``); ``{name: [ids]}``: the modules whose name is ``name`` or
  ends with ``.name`` (an ``nn.Embedding``, or an ``nn.Linear`` whose output rows are the tokens').
- Tied output embedding (``config.tie_word_embeddings`` and a layer sharing the embedding's
  weight, e.g. the LM head): it gets a tied unit that reads the same rows, so the head scores the
  new tokens with the trained rows too; the file has nothing for it (as HF writes it). A dict
  naming the tied layer with the same ids means the same; with other ids it is refused.

How the rows act (``TokenRows``, a ``runs_first`` unit of the embedding's ``AdapterLayer``): the
base layer runs as usual and the unit adds ``rows − W[ids]`` on the positions of those tokens
(an embedding: one small lookup into a (tokens + 1, dim) table; a linear layer: ``x (rows −
W[ids])ᵀ`` added to the token columns), so the output equals the base with the rows replaced,
as in HF, and the vocabulary-sized weight is never copied. Merging writes the rows into W (and
keeps the replaced rows for unmerging); as a ``runs_first`` unit it merges before the other
adapters of the layer, so a LoRA on the same embedding still adds its update on those rows.
Two token adapters cannot be active on one layer together (as in HF). Mixed-adapter batches
work: the unit's ``MixTerms`` are a rank-``tokens`` pair (a one-hot selection and the row changes).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .layer import AdapterLayer
from .unit import FILE_PREFIX, Host, MixTerms, Unit, adapter_factory
from .targeting import logical_modules, matches

FILE_KEY = "token_adapter.trainable_tokens_delta"
DEFAULT_LAYER = "embed_tokens"  # HF's fallback name when the model has no get_input_embeddings


def check_indices(value: Any) -> Any:
    """``trainable_token_indices``: None, a list of token ids, or {module name: list of ids}."""
    if value is None:
        return None
    if isinstance(value, dict):
        if not value:
            raise ConfigError("trainable_token_indices: expected a non-empty mapping of module name -> token ids")
        out = {}
        for key, ids in value.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"trainable_token_indices: expected module names as keys, found {key!r}")
            out[key] = _check_ids(f"trainable_token_indices[{key!r}]", ids)
        return out
    return _check_ids("trainable_token_indices", value)


def _check_ids(label: str, ids: Any) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{label}: expected a non-empty list of token ids (integers >= 0), found {ids!r}")
    if len(set(ids)) != len(ids):
        twice = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ConfigError(f"{label}: token ids repeat ({', '.join(map(str, twice))}); each row is trained once")
    return list(ids)


# -- the unit -------------------------------------------------------------------------------


class TokenRows(Unit):
    """The trained rows of some tokens of an ``nn.Embedding`` (looked up) or ``nn.Linear``
    (output rows). A tied unit (``owner`` given) reads the rows of the embedding's unit and owns
    no parameter."""

    mergeable = True
    runs_first = True  # it replaces base rows: merged before, and computed against, the base alone

    def __init__(self, base: nn.Module, indices: list[int], owner: "TokenRows | None" = None) -> None:
        super().__init__()
        self.kind = "embedding" if isinstance(base, nn.Embedding) else "linear"
        self.__dict__["_base"] = base  # a reference, not a submodule: the host owns it
        self.__dict__["_owner"] = owner
        weight = base.weight
        idx = torch.tensor(indices, dtype=torch.long, device=weight.device)
        self.register_buffer("token_indices", idx, persistent=False)
        if self.kind == "embedding":  # id -> 1 + its row in the table, 0 for every other id
            slot = torch.zeros(weight.shape[0], dtype=torch.long, device=weight.device)
            slot[idx] = torch.arange(1, len(indices) + 1, device=weight.device)
            self.register_buffer("slot", slot, persistent=False)
        if owner is None:
            with torch.no_grad():
                rows = weight.index_select(0, idx).to(**adapter_factory(base)).clone()
            self.trainable_tokens_delta = nn.Parameter(rows)  # HF's name; the rows themselves
        self._saved: tuple[torch.Tensor, torch.Tensor] | None = None  # while merged: (replaced, written)

    @property
    def tied(self) -> bool:
        return self._owner is not None

    def rows(self) -> torch.Tensor:
        return (self._owner if self.tied else self).trainable_tokens_delta

    def _change(self) -> torch.Tensor:
        """rows − W[ids]: what the unit adds at the tokens' positions (W read live, not trained)."""
        rows = self.rows()
        return rows - self._base.weight.index_select(0, self.token_indices).detach().to(rows.dtype)

    def _embed_scale(self) -> Any:
        return getattr(self._base, "embed_scale", None)  # scaled embeddings (Gemma) scale their lookup

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        change = self._change()
        if self.kind == "embedding":
            table = F.pad(change, (0, 0, 1, 0))  # row 0: no change
            delta = F.embedding(self.slot[x], table)
            scale = self._embed_scale()
            if scale is not None:
                delta = delta * scale
            return out + delta.to(out.dtype)
        h = x.to(change.dtype) @ change.t()  # (..., tokens): the change of each token's score
        return out.index_add(out.dim() - 1, self.token_indices, h.to(out.dtype))

    def merge_into(self, base: nn.Module) -> None:
        weight = base.weight
        if self.tied and weight is self._owner._base.weight:
            self._saved = None  # the shared rows are written by the embedding's unit
            return
        with torch.no_grad():
            replaced = weight.index_select(0, self.token_indices).clone()
            written = self.rows().detach().to(weight.dtype)
            weight.index_copy_(0, self.token_indices, written)
        self._saved = (replaced, written)

    def unmerge_from(self, base: nn.Module) -> None:
        if self._saved is None:
            return
        replaced, written = self._saved
        weight = base.weight
        with torch.no_grad():
            now = weight.index_select(0, self.token_indices)
            if torch.equal(now, written):
                weight.index_copy_(0, self.token_indices, replaced)
            else:  # another unit of a tied layer changed these rows since: take out only this change
                weight.index_add_(0, self.token_indices, replaced - written)
        self._saved = None

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.tied else {FILE_KEY: self.trainable_tokens_delta}

    def mix_terms(self) -> MixTerms:
        with torch.no_grad():
            change = self._change()
            n = change.shape[0]
            picks = torch.arange(n, device=change.device)
            if self.kind == "embedding":
                a = change.new_zeros((n, self._base.weight.shape[0]))
                a[picks, self.token_indices] = 1.0  # one-hot: a token id selects its rank
                scale = self._embed_scale()
                b = (change * scale if scale is not None else change).t().contiguous()
                return MixTerms("embedding", a=a, b=b)
            b = change.new_zeros((self._base.weight.shape[0], n))
            b[self.token_indices, picks] = 1.0  # each rank writes its token's column
            return MixTerms("linear", a=change.clone(), b=b)

    def mix_sources(self) -> list[torch.Tensor]:
        return [self.rows(), self._base.weight]

    def extra_repr(self) -> str:
        return f"tokens={self.token_indices.numel()}, {self.kind}" + (", tied" if self.tied else "")


# -- which layers ---------------------------------------------------------------------------


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _input_embedding_path(model: nn.Module, names: list[tuple[str, nn.Module]]) -> str:
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except (AttributeError, NotImplementedError):
            emb = None
    if emb is not None:
        for path, module in names:
            if module is emb or _base(module) is _base(emb):
                return path
    return DEFAULT_LAYER


def _layers(model: nn.Module, spec: Any) -> tuple[dict[str, list[int]], dict[str, nn.Module], str | None]:
    """{path: ids} of the layers asked for, the modules by path, and the input embedding's path."""
    names = [(n, m) for n, m in logical_modules(model) if n]
    by_path = dict(names)
    emb_path = _input_embedding_path(model, names)
    asked = spec if isinstance(spec, dict) else {emb_path: spec}
    layers: dict[str, list[int]] = {}
    for key, ids in asked.items():
        hits = [n for n, _ in names if matches([key], n)]
        if not hits:
            near = [n for n, m in names if isinstance(_base(m), (nn.Embedding, nn.Linear))][:8]
            raise ConfigError(f"trainable_token_indices: {key!r} matches no module of {type(model).__name__}"
                              + (f"; embedding and linear layers include: {', '.join(near)}" if near else ""))
        for path in hits:
            layers[path] = list(ids)
    return layers, by_path, (emb_path if emb_path in by_path else None)


def _tied_paths(model: nn.Module, by_path: dict[str, nn.Module], emb_path: str) -> list[str]:
    """Layers sharing the input embedding's weight, when the model's config ties them."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return []
    weight = _base(by_path[emb_path]).weight
    out = []
    for path, module in by_path.items():
        if path == emb_path or (isinstance(module, Host) and not isinstance(module, AdapterLayer)):
            continue
        base = _base(module)
        if isinstance(base, (nn.Embedding, nn.Linear)) and base.weight is weight:
            out.append(path)
    return out


def plan(model: nn.Module, config: Any, targets: list[tuple[str, nn.Module]]) -> list[tuple]:
    """The token units of ``config`` as ``(path, module, unit, host class)``, built before the
    model changes; ``ConfigError`` for a layer that cannot take them."""
    spec = getattr(config, "trainable_token_indices", None)
    if spec is None:
        return []
    layers, by_path, emb_path = _layers(model, spec)
    tied: list[str] = []
    if emb_path is not None and emb_path in layers:
        for path in _tied_paths(model, by_path, emb_path):
            if path in layers and layers[path] != layers[emb_path]:
                raise ConfigError(f"trainable_token_indices: {path!r} shares its weight with {emb_path!r} "
                                  f"(tie_word_embeddings) but lists other token ids ({layers[path]} vs "
                                  f"{layers[emb_path]}); give both the same ids, or name only {emb_path!r}")
            layers.pop(path, None)
            tied.append(path)
    adapted = {path for path, _ in targets}
    saved = list(getattr(config, "modules_to_save", None) or [])
    for path in [*layers, *tied]:
        if path in adapted:
            raise ConfigError(f"trainable_token_indices: {path!r} is also in target_modules; an adapter either "
                              "trains a layer's token rows or puts LoRA on it, not both")
        if saved and matches(saved, path):
            raise ConfigError(f"trainable_token_indices: {path!r} is in modules_to_save, which trains it in full; "
                              "name it in one of the two")
    out = []
    owners: dict[str, TokenRows] = {}
    for path, ids in layers.items():
        module = by_path[path]
        base = _check_layer(path, module)
        rows = base.weight.shape[0]
        if max(ids) >= rows:
            raise ConfigError(f"trainable_token_indices: token id {max(ids)} is out of range for {path!r} "
                              f"({rows} rows); resize the embeddings first (model.resize_token_embeddings)")
        unit = TokenRows(base, ids)
        owners[path] = unit
        out.append((path, module, unit, AdapterLayer))
    for path in tied:
        module = by_path[path]
        out.append((path, module, TokenRows(_check_layer(path, module), layers[emb_path], owner=owners[emb_path]),
                    AdapterLayer))
    return out


def _check_layer(path: str, module: nn.Module) -> nn.Module:
    if isinstance(module, Host) and not isinstance(module, AdapterLayer):
        raise ConfigError(f"trainable_token_indices: {path!r} is held by another adapter in full "
                          f"({type(module).__name__}); its token rows cannot be trained as well")
    base = _base(module)
    if not isinstance(base, (nn.Embedding, nn.Linear)):
        raise ConfigError(f"trainable_token_indices: {path!r} is a {type(base).__name__}; token rows are trained "
                          "on an nn.Embedding or an nn.Linear (an output head)")
    if isinstance(base, nn.Embedding) and base.max_norm is not None:
        raise ConfigError(f"trainable_token_indices: {path!r} renormalises its rows (max_norm); not supported")
    return base


def optional_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor | None]:
    """Keys HF PEFT adds to a token adapter's file when the vocabulary was resized (it then saves
    the embedding layers): the base weight of each token layer (loaded into the base) and the tied
    layer's copy of the rows (ignored: the embedding's are the same)."""
    out: dict[str, torch.Tensor | None] = {}
    for path, module in logical_modules(model):
        if isinstance(module, AdapterLayer) and isinstance(module.adapters._modules.get(name), TokenRows):
            out[f"{FILE_PREFIX}{path}.token_adapter.base_layer.weight"] = module.base_layer.weight
            if module.adapters[name].tied:
                out[f"{FILE_PREFIX}{path}.{FILE_KEY}"] = None
    return out
