"""Shared plumbing of the input methods: prompt tuning, P-tuning and prefix tuning.

An input method changes what goes *into* the model, not its weights. Each one is an
``InputAdapter`` that produces either

- ``"embeddings"``: P virtual token embeddings, shape (P, D), prepended to the input
  embeddings (prompt tuning, P-tuning), or
- ``"prefix"``: P key/value pairs for every attention layer, shape (P, L·2·kv_dim), placed
  in the KV cache before the real tokens (prefix tuning).

All of a model's input adapters live in one ``PromptHost``, a child module of the model
(``model.peftkit_prompts``), which installs one forward pre-hook on the model. The hook is
the whole mechanism; it rewrites the keyword arguments of every forward call:

- ``inputs_embeds`` = [virtual embeddings; embeddings of ``input_ids``], ``input_ids`` = None.
- the KV cache (``cache`` in transformers 5.24, ``past_key_values`` before; the name is read
  from the forward signature) receives the prefixes, layer by layer.
- ``attention_mask`` gets S = P_prefix + P_embeddings leading ones (a mask of ones is made when
  none is given, since encoders size their attention from it).
- ``token_type_ids`` get P_embeddings leading zeros; 2-D ``labels`` (causal LM) get
  P_embeddings leading -100, so the virtual positions carry no loss.
- ``position_ids`` are always passed explicitly:

  * decoders (causal attention): real tokens count from S, from the attention mask (the
    i-th real token of a row has position S + i whatever the padding); virtual tokens take
    P_prefix .. S−1. Prefix tuning therefore puts the real tokens at P..P+T−1, and prompt
    tuning the virtual ones at 0..P−1 and the real ones at P..P+T−1, as HF PEFT does.
  * encoders (BERT family, bidirectional): virtual *embeddings* take positions 0..P−1 and the
    real tokens P..P+T−1 (HF PEFT's layout, which its files are trained with). Prefixes have no
    position: they are keys and values, not tokens, so with prefix tuning the real tokens keep
    their own positions 0..T−1 and [CLS] stays at position 0, where BERT was pretrained to
    read it (transformers would otherwise shift them by the cache length).

- decoder sequence classification: the head of GPT-2/Llama-style models pools the last
  position when it is given embeddings instead of ids, which is a pad position for a
  right-padded row (the flaw HF PEFT has). The hook therefore moves the padding of such rows
  to the left (a stable per-row reordering of embeddings, mask and positions; positions move
  with their tokens, so every real token computes exactly what it computed before), and the
  head reads the last real token. With prefix tuning the ids are kept, and the head finds
  the last real token from them itself.

Generation (``model.generate``) runs through the same hook. A call whose cache is empty (or
absent) is a prefill: the virtual tokens / prefixes are added. A call whose cache already
holds tokens is a decoding step: nothing is added (the cache holds the virtual tokens
already), only the caller's attention mask is extended by S and its positions shifted by S.
So the virtual tokens enter the cache once and are never duplicated.

Several active input adapters compose by concatenation in activation order (their prefixes
one after another, their virtual embeddings one after another). Causal-LM logits cover the
virtual positions too, shape (B, P+T, V), as in HF PEFT.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.nn as nn

from .config import PeftConfig, check_names, check_positive_int
from .errors import ConfigError, ModelError
from .layer import NamedAdapters

ATTR = "peftkit_prompts"  # the PromptHost's attribute name on the model
IGNORE_INDEX = -100
TASKS = ("SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields the three input methods share; names as in HF PEFT's ``adapter_config.json``.

    ``token_dim``, ``num_layers``, ``num_attention_heads`` and ``num_transformer_submodules``
    are read from the model when left as None (and checked against it when given).
    """

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(
                f"num_transformer_submodules: peftkit's input methods support encoder-only and decoder-only "
                f"models (1), found {self.num_transformer_submodules!r} (an encoder-decoder model)"
            )
        check_names("modules_to_save", self.modules_to_save, allow_str=False)
        if self.modules_to_save is not None:
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save))


# -- what the plumbing needs to know about a model ------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int  # width of the input embeddings
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    causal: bool  # decoder attention (positions follow the mask; classification pools the last token)
    cache_arg: str | None  # keyword of the KV cache in forward, None when the model takes none
    forward_args: tuple[str, ...]  # forward's parameter names, to turn positional args into keywords
    takes_position_ids: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _cache_name(params: Iterable[str]) -> str | None:
    params = set(params)
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def describe(model: nn.Module) -> ModelShape:
    """Read sizes and calling conventions from a transformers model; ConfigError if it is not one."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_input_embeddings", None)):
        raise ConfigError(f"{name}: input methods need a transformers model (with .config and get_input_embeddings())")
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{name}: encoder-decoder models are not supported by peftkit's input methods "
                          "(prompt tuning, P-tuning, prefix tuning); use an encoder-only or decoder-only model")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*keys: str) -> Any:
        return next((getattr(text, k) for k in keys if getattr(text, k, None) is not None), None)

    embeddings = model.get_input_embeddings()
    hidden = getattr(embeddings, "weight", None)
    layers, heads = first("num_hidden_layers", "n_layer", "num_layers"), first("num_attention_heads", "n_head", "num_heads")
    if hidden is None or hidden.dim() != 2 or layers is None or heads is None:
        raise ConfigError(f"{name}: cannot read the embedding width, layer count and head count from its config")
    width = first("hidden_size", "n_embd", "d_model") or hidden.shape[1]
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim") or width // heads
    params = inspect.signature(model.forward).parameters
    cache_arg = _cache_name(params)
    if cache_arg is None and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        backbone = getattr(model, "base_model", None)  # e.g. BertForSequenceClassification passes **kwargs on
        if isinstance(backbone, nn.Module) and backbone is not model:
            cache_arg = _cache_name(inspect.signature(backbone.forward).parameters)
    causal = bool(getattr(text, "is_decoder", False)) or any(
        getattr(m, "is_causal", False) is True for m in model.modules()
    )
    positional = tuple(n for n, p in params.items()
                       if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return ModelShape(name, int(hidden.shape[1]), int(layers), int(heads), int(kv_heads), int(head_dim), causal,
                      cache_arg, positional, "position_ids" in params)


# -- the adapters and their host ------------------------------------------------------------


class InputAdapter(nn.Module):
    """One named input adapter. ``prompt()`` is what it feeds the model; ``file_tensor()``
    what HF PEFT's file stores under ``prompt_embeddings`` (the same values)."""

    kind: ClassVar[str] = "embeddings"  # or "prefix"

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens

    def prompt(self) -> torch.Tensor:
        raise NotImplementedError

    def file_tensor(self) -> torch.Tensor:
        """A live parameter when the prompt is one (so loading can copy into it)."""
        return self.prompt()


class PromptHost(NamedAdapters):
    """Holds a model's input adapters and the forward pre-hook that feeds them in."""

    def __init__(self, shape: ModelShape, task_type: str | None) -> None:
        super().__init__()
        self.shape = shape
        self.classify_last_token = shape.causal and task_type == "SEQ_CLS"  # move right padding left
        self.token_labels = task_type == "CAUSAL_LM"  # labels (B, T) get -100 for the virtual tokens
        self._handles: list[Any] = []
        self._drop_cache = False  # set when this call's cache was made here although use_cache=False
        self._mix = None  # a mixed-adapter call's per-row prompts (serving.PromptMix)
        self._refresh()

    def install(self, model: nn.Module) -> None:
        self._handles = [model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                         model.register_forward_hook(self._post_hook)]

    # -- the Host protocol (names, add, remove, set_active, … from NamedAdapters) -----------
    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.adapters[name].file_tensor()}

    def restore(self, merge: bool) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return None  # the model never had this module

    def _refresh(self) -> None:
        run = () if self.disabled else tuple(self.adapters[n] for n in self.active)
        self._embeds = tuple(a for a in run if a.kind == "embeddings")
        self._prefixes = tuple(a for a in run if a.kind == "prefix")

    # -- the hook ---------------------------------------------------------------------------
    def _pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mix = self._mix
        if (not self._embeds and not self._prefixes) if mix is None else mix.adapters is None:
            return None
        kwargs = dict(kwargs)
        if args:
            names = self.shape.forward_args
            if len(args) > len(names):
                raise ModelError(f"{self.shape.name}.forward: {len(args)} positional arguments, expected at most {len(names)}")
            for key, value in zip(names, args):
                if key in kwargs:
                    raise ModelError(f"{self.shape.name}.forward: {key!r} given twice")
                kwargs[key] = value
        return (), self.extend(model, kwargs)

    def _post_hook(self, model: nn.Module, args: tuple, output: Any) -> Any:
        # A model that returns its cache even with use_cache=False (Llama) must not hand back
        # the one made here for the prefixes: a caller (generate) would take it for its own.
        if self._drop_cache:
            self._drop_cache = False
            key = self.shape.cache_arg
            if isinstance(output, dict) and output.get(key) is not None:
                output[key] = None
        return output

    def extend(self, model: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
        """Rewrite one forward call's keyword arguments (see the module docstring)."""
        shape = self.shape
        self._drop_cache = False
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise ModelError("input methods need input_ids or inputs_embeds")
        batch, length = ref.shape[0], ref.shape[1]
        device = ref.device
        mix = self._mix  # a mixed-adapter batch: one adapter per row, each (B, P, ·)
        if mix is None:
            n_embed = sum(a.num_virtual_tokens for a in self._embeds)
            n_prefix = sum(a.num_virtual_tokens for a in self._prefixes)
        else:
            n_embed, n_prefix = (mix.tokens, 0) if mix.kind == "embeddings" else (0, mix.tokens)
        total = n_embed + n_prefix
        cache = kw.get(shape.cache_arg) if shape.cache_arg else None
        past = cache_length(cache)
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ModelError(f"input methods need a 2-D attention mask (batch, length), found shape {tuple(mask.shape)}")
        shift = n_prefix if shape.causal else 0  # where the virtual embeddings start counting
        pos = kw.get("position_ids")

        if past > 0:  # a decoding step: the cache holds the virtual tokens already
            if mask is not None and mask.shape[1] + total == past + length:
                kw["attention_mask"] = _ones_before(mask, total)
            if shape.takes_position_ids:
                if pos is not None:
                    kw["position_ids"] = pos + shift + n_embed
                elif shape.causal and mask is not None:
                    kw["position_ids"] = mask_positions(kw["attention_mask"])[:, -length:]
            return kw

        if n_prefix:
            if shape.cache_arg is None:
                raise ModelError(f"{shape.name}.forward takes no KV cache, which prefix tuning needs")
            if model.training and gradient_checkpointing(model):
                raise ModelError("prefix tuning does not work with gradient checkpointing (the layers drop the cache); "
                                 "call model.gradient_checkpointing_disable()")
            weight = model.get_input_embeddings().weight
            self._drop_cache = cache is None and kw.get("use_cache") is False
            kw[shape.cache_arg] = self._fill_cache(model, cache, batch, weight.dtype, weight.device)
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if n_embed:
            if embeds is None:
                embeds = model.get_input_embeddings()(ids)  # (B, T, D)
            if mix is None:
                prompts = torch.cat([a.prompt() for a in self._embeds]).unsqueeze(0).expand(batch, -1, -1)
            else:
                prompts = mix.prompts()
            kw["inputs_embeds"] = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)  # (B, P_e+T, D)
            kw["input_ids"] = None
            if kw.get("token_type_ids") is not None:
                tt = kw["token_type_ids"]
                kw["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], n_embed), tt], dim=1)
            labels = kw.get("labels")
            if self.token_labels and labels is not None and labels.dim() == 2 and labels.shape[1] == length:
                kw["labels"] = torch.cat([labels.new_full((labels.shape[0], n_embed), IGNORE_INDEX), labels], dim=1)
        kw["attention_mask"] = _ones_before(mask, total)
        if shape.takes_position_ids:
            if pos is None:
                pos = mask_positions(mask) if shape.causal else torch.arange(length, device=device).expand(batch, -1)
            virtual = (shift + torch.arange(n_embed, device=device)).expand(pos.shape[0], -1)
            kw["position_ids"] = torch.cat([virtual, pos + shift + n_embed], dim=1)  # (B, P_e+T)
        if kw.get("cache_position") is not None:  # transformers releases whose forward takes cache positions
            cp = kw["cache_position"]
            kw["cache_position"] = torch.cat([n_prefix + torch.arange(n_embed, device=cp.device), cp + total])
        if n_embed and self.classify_last_token:
            _move_padding_left(kw, batch)
        return kw

    def _fill_cache(self, model: nn.Module, cache: Any, batch: int, dtype: torch.dtype, device: torch.device) -> Any:
        """Put the active prefixes into ``cache`` (a new DynamicCache when None), layer by layer."""
        shape = self.shape
        if self._mix is None:
            flat = torch.cat([a.prompt() for a in self._prefixes])  # (P, L·2·kv_dim)
        else:
            flat = self._mix.prompts()  # (B, P, L·2·kv_dim): each row its own
        flat = flat.to(device=device, dtype=dtype)
        pairs = prefix_key_values(flat, shape.num_layers, shape.kv_heads, shape.head_dim, batch)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        for layer, (key, value) in enumerate(pairs):
            cache.update(key, value, layer)
        return cache


def prefix_key_values(flat: torch.Tensor, num_layers: int, heads: int, head_dim: int, batch: int
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """HF PEFT's layout of ``prompt_embeddings`` for prefix tuning, (P, L·2·H·d), into per-layer
    (key, value) pairs, each (B, H, P, d): column block 2l is layer l's key, 2l+1 its value.
    ``flat`` may also be (B, P, L·2·H·d), one prefix per row (a mixed-adapter batch)."""
    if flat.dim() == 3:
        kv = flat.view(batch, flat.shape[1], num_layers * 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    else:
        tokens = flat.shape[0]
        kv = flat.view(tokens, num_layers * 2, heads, head_dim).permute(1, 2, 0, 3)  # (L·2, H, P, d)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (L·2, B, H, P, d)
    return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(num_layers)]


def cache_length(cache: Any) -> int:
    """Tokens a KV cache holds: 0 for None or an empty cache; legacy tuples are read too."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def gradient_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position of every token counted over the real tokens of its row: (B, L) -> (B, L)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _ones_before(mask: torch.Tensor, count: int) -> torch.Tensor:
    return torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)


def _move_padding_left(kw: dict[str, Any], batch: int) -> None:
    """Reorder each right-padded row so its padding comes first (stable, so real tokens keep
    their order; positions travel with their tokens)."""
    mask = kw["attention_mask"]
    if bool(mask[:, -1].all()):
        return
    order = torch.sort(mask.long(), dim=1, stable=True).indices  # (B, L): pads first
    kw["attention_mask"] = mask.gather(1, order)
    for key in ("position_ids", "token_type_ids"):
        if kw.get(key) is not None:
            kw[key] = kw[key].expand(batch, -1).gather(1, order)
    embeds = kw["inputs_embeds"]
    kw["inputs_embeds"] = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))


# -- attaching -------------------------------------------------------------------------------


def _fill_or_check(config: PromptLearningConfig, field_name: str, value: int, shape: ModelShape, check: bool) -> None:
    given = getattr(config, field_name)
    if given is None:
        setattr(config, field_name, value)
    elif check and given != value:
        raise ConfigError(f"{field_name}: the config says {given} but {shape.name} has {value}")


def attach(model: nn.Module, config: PromptLearningConfig, name: str,
           build: Callable[[PromptLearningConfig, ModelShape, nn.Module], InputAdapter]) -> None:
    """Check the model and task, fill the config's model sizes, build the adapter, host it.

    Raises ConfigError before changing anything.
    """
    shape = describe(model)
    if config.task_type not in TASKS:
        raise ConfigError(f"task_type {config.task_type!r}: peftkit's input methods support "
                          f"{', '.join(TASKS)} (model {shape.name})")
    prefix = getattr(config, "peft_type", "") == "PREFIX_TUNING"
    if prefix:
        if shape.cache_arg is None:
            raise ConfigError(f"{shape.name}.forward takes no KV cache ('cache' or 'past_key_values'), "
                              "so prefix tuning cannot feed it key/value prefixes")
        if gradient_checkpointing(model):
            raise ConfigError("prefix tuning does not work with gradient checkpointing (the layers drop the cache); "
                              "call model.gradient_checkpointing_disable() first")
    _fill_or_check(config, "num_transformer_submodules", 1, shape, True)
    _fill_or_check(config, "num_layers", shape.num_layers, shape, prefix)
    _fill_or_check(config, "num_attention_heads", shape.kv_heads if prefix else shape.num_heads, shape, prefix)
    # prefix tuning stores keys/values: with grouped-query attention, kv heads × head size
    _fill_or_check(config, "token_dim", shape.kv_dim if prefix else shape.hidden_size, shape, True)
    if prefix and config.token_dim % config.num_attention_heads:
        raise ConfigError(f"token_dim {config.token_dim} is not a multiple of num_attention_heads {config.num_attention_heads}")
    host = model._modules.get(ATTR)
    if host is not None and not isinstance(host, PromptHost):
        raise ConfigError(f"{shape.name} has a module named {ATTR!r} already")
    adapter = build(config, shape, model)
    weight = model.get_input_embeddings().weight
    adapter.to(device=weight.device)
    adapter.train(model.training)
    if host is None:
        host = PromptHost(shape, config.task_type)
        host.train(model.training)
        model.add_module(ATTR, host)
        host.install(model)
    host.add(name, adapter)
