"""``peftkit generate``: completions from a causal LM with a trained adapter.

Prompts are tokenized exactly as the prompts of training data were (``lm_data.LMEncoder``):

- by default as the ``prompt`` of a ``prompt``/``response`` example (a BOS first when the
  tokenizer adds one; no separator added, so end the prompt as the training prompts ended);
- with ``chat=True`` (``--chat``) as one user message followed by the assistant's generation
  prompt, in the format ``messages`` training data used: the tokenizer's chat template when
  it has one, else peftkit's fallback chat format.

Decoding is greedy by default; ``do_sample`` samples with ``temperature``, ``top_p`` and
``top_k`` from a generator seeded with ``seed`` (same prompts, seed and batch size -> same
completions). Other settings come from the model's own ``generation_config`` (its EOS ids, for
instance). Prompts are batched with left padding; a completion ends at EOS or after
``max_new_tokens`` tokens, and is decoded without special tokens.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import ConfigError, DataError
from .adapted import resolve
from .causal_lm import load_adapted_lm
from .data import json_object, json_type, read_text
from .lm_data import JSONL_SUFFIXES, LMEncoder
from .models import max_positions
from .progress import Console


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: JSON Lines (``.jsonl``/``.ndjson``/``.json``, or a first character
    ``{``) with ``{"prompt": str}`` per line, or plain text with one prompt per line. Blank lines
    are skipped; ``DataError`` names the file and line of anything malformed."""
    name = os.fspath(path)
    text = read_text(name)
    jsonl = Path(name).suffix.lower() in JSONL_SUFFIXES or text.lstrip().startswith("{")
    prompts = []
    for line, raw in enumerate(io.StringIO(text, newline=None), 1):
        if not raw.strip():
            continue
        prompts.append(_json_prompt(name, line, raw) if jsonl else raw.rstrip("\n"))
    if not prompts:
        raise DataError(f"{name}: no prompts")
    return prompts


def _json_prompt(name: str, line: int, raw: str) -> str:
    obj = json_object(name, line, raw, 'a JSON object {"prompt": "..."}')
    if "prompt" not in obj:
        raise DataError(f'{name} line {line}: expected {{"prompt": "..."}}, found fields '
                        f'{", ".join(repr(k) for k in obj) or "none"}')
    if not isinstance(obj["prompt"], str):
        raise DataError(f"{name} line {line}: 'prompt' must be a string, found {json_type(obj['prompt'])}")
    return obj["prompt"]


def check_settings(max_new_tokens: int, temperature: float, top_p: float, top_k: int, batch_size: int) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: expected a positive integer, found {max_new_tokens}")
    if not temperature > 0:
        raise ConfigError(f"--temperature: expected a positive number, found {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p: expected a number in (0, 1], found {top_p}")
    if top_k < 0:
        raise ConfigError(f"--top-k: expected a non-negative integer (0: no top-k), found {top_k}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive integer, found {batch_size}")


def generation_config(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int, do_sample: bool,
                      temperature: float, top_p: float, top_k: int):
    """The model's generation config with our decoding settings on top."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.do_sample = do_sample
    config.num_beams = 1
    # Greedy decoding takes no sampling knobs (a model's defaults, e.g. temperature 0.6, would be warned about).
    config.temperature, config.top_p, config.top_k = (temperature, top_p, top_k) if do_sample else (None, None, None)
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id
    return config


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ``input_ids`` (B, T) padded on the left with ``pad_id``, and the
    ``attention_mask`` (B, T), 0 on the padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[b, width - len(r):] = 1
    return ids, mask


def _eos_ids(config) -> set[int]:
    eos = config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


def generate(model: str | None, adapter: str, prompts: list[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50, seed: int = 0,
             device: torch.device | None = None, console: Console | None = None, chat: bool = False,
             batch_size: int = 8, allow_pickle: bool = False) -> list[dict[str, str]]:
    """``[{"prompt", "completion"}, ...]``, one per prompt, in order (module docstring).

    ``model``: the base model (a directory or a bundled name), else the one the adapter was
    trained on (``train_args.json``, or the adapter config's ``base_model_name_or_path`` when
    that is a local directory); ``adapter``: an adapter directory (any HF PEFT can load, of a
    causal LM) or a run directory. ``allow_pickle``: read an ``adapter_model.bin``."""
    check_settings(max_new_tokens, temperature, top_p, top_k, batch_size)
    if not prompts:
        raise ConfigError("no prompts given")
    device = device or torch.device("cpu")
    console = console or Console(quiet=True, to_stderr=True)
    source = resolve(adapter, model, allow_pickle)
    if source.task != "causal-lm":
        raise ConfigError(f"{source.adapter_dir}: a {source.task} adapter (from {source.task_from}); generate needs "
                          "a causal-LM adapter (task_type CAUSAL_LM)")
    adapted, tokenizer = load_adapted_lm(source, model, device)
    encoder = LMEncoder(tokenizer)
    if chat and not getattr(tokenizer, "chat_template", None):
        console.info("--chat: the tokenizer has no chat template; using peftkit's fallback chat format")
    encoded = [encoder.prompt_ids(p, chat) for p in prompts]
    _check_prompts(encoded, adapted, max_new_tokens)
    console.info(source.line())
    config = generation_config(adapted.model, tokenizer, max_new_tokens, do_sample, temperature, top_p, top_k)
    stop = _eos_ids(config)
    torch.manual_seed(seed)
    results = []
    batches = range(0, len(prompts), batch_size)
    with console.progress(len(batches), "generate", lines=False) as bar:
        for start in batches:
            ids, mask = left_pad(encoded[start:start + batch_size], config.pad_token_id or 0)
            with torch.no_grad():
                out = adapted.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                             generation_config=config)  # (B, T + new)
            for prompt, row in zip(prompts[start:start + batch_size], out[:, ids.shape[1]:].tolist()):
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                results.append({"prompt": prompt, "completion": tokenizer.decode(row[:cut], skip_special_tokens=True)})
            bar.update()
    return results


def _check_prompts(encoded: list[list[int]], adapted, max_new_tokens: int) -> None:
    """Every prompt has a token, and prompt + virtual tokens + new tokens fit the model's positions."""
    import peftkit

    for i, ids in enumerate(encoded, 1):
        if not ids:
            raise ConfigError(f"prompt {i} is empty (and the tokenizer adds no BOS token to start from)")
    limit = max_positions(adapted.model)
    if limit is None:
        return
    full = adapted.source is not None and adapted.source.full  # a full fine-tuning run's model: no adapter config
    virtual = 0 if full else getattr(peftkit.read_config(adapted.adapter_dir), "num_virtual_tokens", 0) or 0
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
    need = len(encoded[longest]) + virtual + max_new_tokens
    if need > limit:
        extra = f" + {virtual} virtual tokens" if virtual else ""
        raise ConfigError(f"prompt {longest + 1} has {len(encoded[longest])} tokens{extra}; with --max-new-tokens "
                          f"{max_new_tokens} that is {need} positions, but the model has {limit}")
