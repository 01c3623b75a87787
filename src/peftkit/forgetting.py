"""Forgetting: how much an adapter (or full fine-tuning) changed what the base model does on
data that has nothing to do with the task.

A task metric says how well a model learned its task; it says nothing about what the model
lost on the way. This module runs the base model and the trained model on the same reference
data, unrelated to any task, and reports how far apart they are:

- ``"encoder"`` (a model judged by its sentence embeddings: the classify task, whatever the
  architecture): every reference sentence is embedded by the encoder body's last hidden state
  (``model.base_model``, never a classification head), mean-pooled over the real tokens by the
  attention mask. ``forgetting = 1 − mean cosine similarity`` between the base's and the
  trained model's embedding of each sentence (0: unchanged). With sentence pairs graded 0–5
  (STS style), the Spearman correlation ρ between the cosine similarity of a pair's two
  embeddings and its grade is computed for both models: ``spearman_change = after − before``
  (negative: the trained model's embeddings reflect meaning less well than the base's).
- ``"causal-lm"``: the perplexity of both models on the reference text;
  ``forgetting = perplexity_after / perplexity_before − 1`` (0: unchanged; 0.1: 10 % worse).

Why these choices:

- Virtual tokens are not sentences: prompt tuning and P-tuning prepend P virtual embeddings
  (``prompting``: they come first, the real tokens are the last T positions), so only the last
  T positions are pooled (and, for a causal LM, scored). Decoders are padded on the left here,
  with positions counted over the real tokens, so that ``prompting``'s move of a decoder
  classifier's right padding never reorders a row. Prefix tuning adds no positions (its
  prefixes are keys and values), so nothing is excluded for it.
- The "before" side is always the float base. For QLoRA that means the figure includes what
  4-bit quantization itself changed: the user runs the quantized model with the adapter, and
  it is that model's distance from the float base that matters. ``measure_run`` loads the
  trained model and the base one after the other (never both at once), so the base is never
  the trained model with its adapter switched off: that would be wrong for an adapter whose
  initialisation rewrote the base weights (PiSSA, OLoRA, LoftQ) or a 4-bit base.
- Causal-LM text is tokenized once, without special tokens, and cut into consecutive windows
  of ``min(256, the model's positions − its virtual tokens)`` tokens; in each window every
  token after the first is predicted. Both models see exactly the same windows.

The bundled reference set (``data/reference/``) was written for peftkit: ``pairs.jsonl``,
378 sentence pairs on everyday topics graded 0–5 (63 of each grade), and ``text.txt``, about
3,400 words of instructions, a story, a news report, a letter, science explanations, a travel
guide and a dialogue. ``docs/forgetting.md`` describes the formats a ``--reference`` file may
have.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, DataError, ModelError

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
PAIRS_FILE = REFERENCE_DIR / "pairs.jsonl"
TEXT_FILE = REFERENCE_DIR / "text.txt"
ENCODER, CAUSAL_LM = "encoder", "causal-lm"
KINDS = (ENCODER, CAUSAL_LM)
MAX_WINDOW = 256  # tokens per causal-LM window (fewer when the model has fewer positions)
MAX_SENTENCE_TOKENS = 256
FULL_MODEL_DIR = "model"  # a full fine-tuning run's save_pretrained directory
PAIR_FIELDS = ("sentence1", "sentence2", "score")
MAX_SCORE = 5.0
TASK_KINDS = {"classify": ENCODER, "causal-lm": CAUSAL_LM}  # the training tasks forgetting applies to
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


# -- the reference data --------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """Reference data, usable for both kinds: distinct ``sentences`` (the cosine part), graded
    ``pairs`` of sentence indices (the Spearman part; empty for a plain text) and ``text``
    (the perplexity part)."""

    source: str  # "bundled pairs.jsonl", or the file's path
    sentences: tuple[str, ...]
    pairs: tuple[tuple[int, int, float], ...]  # (index of sentence1, index of sentence2, score)
    text: str

    @property
    def scores(self) -> list[float]:
        return [s for _, _, s in self.pairs]


def load_reference(path: str | os.PathLike | None = None, kind: str = ENCODER) -> Reference:
    """The reference data: the bundled set when ``path`` is None (``pairs.jsonl`` for an
    encoder, ``text.txt`` for a causal LM), else the file ``path``:

    - JSONL (a ``.jsonl``/``.json`` name, or a first line starting with ``{``): one
      ``{"sentence1", "sentence2", "score"}`` object a line, scores from 0 to 5 (other fields
      are ignored). For a causal LM its distinct sentences, one a line, are the text.
    - anything else: plain UTF-8 text. For an encoder its sentences (split after ``.``, ``!``,
      ``?`` and at blank lines) give the cosine part only; there are no pairs, so the
      Spearman figures are None.

    ``DataError`` names the file, and for a bad JSONL row the line and the field.
    """
    _check_kind(kind)
    if path is None:
        bundled = PAIRS_FILE if kind == ENCODER else TEXT_FILE
        reference = _read(bundled, f"bundled {bundled.name}")
        return reference
    return _read(Path(path), str(path))


def _read(path: Path, source: str) -> Reference:
    if not path.is_file():
        raise DataError(f"{source}: reference file not found" if not path.exists()
                        else f"{source}: not a file (expected a JSONL file of sentence pairs or a text file)")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise DataError(f"{source} line {line}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if content.startswith("\ufeff"):
        content = content[1:]
    if not content.strip():
        raise DataError(f"{source}: file is empty")
    first = next(line for line in content.splitlines() if line.strip())
    if path.suffix.lower() in (".jsonl", ".json") or first.lstrip().startswith("{"):
        return _pairs(content, source)
    sentences = tuple(dict.fromkeys(s.strip() for s in _SENTENCE_END.split(content) if s.strip()))
    return Reference(source, sentences, (), content)


def _pairs(content: str, source: str) -> Reference:
    index: dict[str, int] = {}
    pairs: list[tuple[int, int, float]] = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source} line {number}: invalid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{source} line {number}: expected a JSON object with the fields "
                            f"{', '.join(PAIR_FIELDS)}, found {type(row).__name__}")
        for name in PAIR_FIELDS:
            if name not in row:
                raise DataError(f"{source} line {number}: missing field {name!r} (a row is "
                                '{"sentence1": ..., "sentence2": ..., "score": 0-5})')
        texts = []
        for name in PAIR_FIELDS[:2]:
            value = row[name]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{source} line {number}: field {name!r}: expected a non-empty string, "
                                f"found {json.dumps(value)}")
            texts.append(value.strip())
        score = row["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= MAX_SCORE:
            raise DataError(f"{source} line {number}: field 'score': expected a number from 0 to 5, "
                            f"found {json.dumps(score)}")
        a, b = (index.setdefault(t, len(index)) for t in texts)
        pairs.append((a, b, float(score)))
    sentences = tuple(index)
    return Reference(source, sentences, tuple(pairs), "\n".join(sentences))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind: expected one of {', '.join(KINDS)}, found {kind!r}")


def kind_of_task(task: str) -> str:
    """The kind of measurement for a training task; ``ConfigError`` for one it does not apply to."""
    if task not in TASK_KINDS:
        raise ConfigError(f"forgetting is measured on text (sentence embeddings for classify, perplexity for "
                          f"causal-lm); the {task} task has no text to measure it on")
    return TASK_KINDS[task]


def _as_reference(reference: str | os.PathLike | Reference | None, kind: str) -> Reference:
    return reference if isinstance(reference, Reference) else load_reference(reference, kind)


# -- statistics ----------------------------------------------------------------------------


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ (the Pearson correlation of the ranks, ties averaged); None when it is
    undefined (fewer than two values, or either side constant)."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


# -- running a model -----------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _virtual_tokens(model: nn.Module) -> tuple[int, int]:
    """(virtual embeddings, prefixes) that ``model``'s active input adapters add to a call."""
    from .prompting import ATTR

    host = model._modules.get(ATTR)
    if host is None or host.disabled:
        return 0, 0
    embeds = sum(host.adapters[n].num_virtual_tokens for n in host.active if host.adapters[n].kind == "embeddings")
    prefixes = sum(host.adapters[n].num_virtual_tokens for n in host.active if host.adapters[n].kind == "prefix")
    return embeds, prefixes


def _positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _is_causal(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "is_decoder", False):
        return True
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


@contextmanager
def _running(model: nn.Module, as_base: bool) -> Iterator[nn.Module]:
    """The model in eval mode, without gradients, and with ``as_base`` its adapters disabled
    (a model without adapters is its own base); its mode restored after."""
    from .adapters import disabled
    from .state import ATTR

    training = model.training
    model.eval()
    off = disabled(model) if as_base and model.__dict__.get(ATTR) is not None else nullcontext()
    try:
        with off, torch.no_grad():
            yield model
    finally:
        model.train(training)


def _body(model: nn.Module) -> nn.Module:
    """The encoder body whose last hidden state is embedded (transformers' ``base_model``:
    ``model.bert`` of a ``BertForSequenceClassification``, the model itself when it is one)."""
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) else model


def embed(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 32,
          progress: Any = None) -> torch.Tensor:
    """Sentence embeddings, (N, D) float64: the encoder body's last hidden state, mean-pooled over
    each sentence's real tokens (virtual tokens excluded). ``model`` runs as it is (put it in
    eval mode, without gradients, and on its device first: ``measure`` does)."""
    body = _body(model)
    causal = _is_causal(model)
    params = _forward_params(model)
    device = _device_of(model)
    n_embed, _ = _virtual_tokens(model)
    positions = _positions(model)
    limit = MAX_SENTENCE_TOKENS if positions is None else min(MAX_SENTENCE_TOKENS, positions - n_embed)
    if limit < 2:
        raise ModelError(f"{type(model).__name__}: {positions} positions leave no room for a sentence after "
                         f"{n_embed} virtual tokens")
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # as load_tokenizer does: decoders ship without one
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])

    handle = body.register_forward_hook(keep)
    out = []
    try:
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                              max_length=limit, return_tensors="pt", padding_side="left" if causal else "right")
            mask = batch["attention_mask"].to(device)
            inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": mask}
            if "token_type_ids" in batch and "token_type_ids" in params:
                inputs["token_type_ids"] = batch["token_type_ids"].to(device)
            if causal and "position_ids" in params:
                inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
            captured.clear()
            model(**inputs)
            if len(captured) != 1:
                raise ModelError(f"{type(model).__name__}: its body {type(body).__name__} ran {len(captured)} times "
                                 "in one forward call; cannot take its last hidden state")
            hidden = captured[0]
            length = mask.shape[1]
            if hidden.dim() != 3 or hidden.shape[1] < length:
                raise ModelError(f"{type(body).__name__}: last hidden state of shape {tuple(hidden.shape)} for "
                                 f"{length} tokens")
            real = hidden[:, -length:].double()  # virtual tokens come first
            weights = mask.unsqueeze(-1).double()
            out.append((real * weights).sum(1) / weights.sum(1).clamp(min=1))
            if progress is not None:
                progress.update()
    finally:
        handle.remove()
    return torch.cat(out).cpu()


def _windows(ids: Sequence[int], window: int) -> list[list[int]]:
    chunks = [list(ids[i:i + window]) for i in range(0, len(ids), window)]
    return [c for c in chunks if len(c) >= 2]


def lm_loss(model: nn.Module, windows: Sequence[Sequence[int]], batch_size: int = 32,
            progress: Any = None) -> tuple[float, int]:
    """(summed token cross-entropy, predicted tokens) of ``model`` over ``windows`` of token ids,
    each predicting its tokens after the first; logits of virtual tokens are left out."""
    device = _device_of(model)
    params = _forward_params(model)
    total, tokens = 0.0, 0
    groups: dict[int, list[Sequence[int]]] = {}
    for w in windows:
        groups.setdefault(len(w), []).append(w)
    for length, same in groups.items():
        for start in range(0, len(same), batch_size):
            ids = torch.tensor(same[start:start + batch_size], dtype=torch.long, device=device)
            kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if "use_cache" in params:
                kwargs["use_cache"] = False
            logits = model(**kwargs).logits[:, -length:]  # (B, T, V): the real tokens'
            total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1), reduction="sum"))
            tokens += ids.shape[0] * (length - 1)
            if progress is not None:
                progress.update()
    return total, tokens


def _window_size(model: nn.Module) -> int:
    positions = _positions(model)
    virtual = sum(_virtual_tokens(model))
    size = MAX_WINDOW if positions is None else min(MAX_WINDOW, positions - virtual)
    if size < 2:
        raise ModelError(f"{type(model).__name__}: {positions} positions leave no room for text after "
                         f"{virtual} virtual tokens")
    return size


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return list(ids)


# -- one side, and the two sides together --------------------------------------------------


def _encoder_side(model: nn.Module, tokenizer: Any, reference: Reference, batch_size: int, base_of: bool,
                  console: Any, label: str) -> dict[str, Any]:
    steps = math.ceil(len(reference.sentences) / batch_size)
    with _running(model, base_of) as running, _bar(console, steps, label) as bar:
        emb = embed(running, tokenizer, reference.sentences, batch_size, bar)
    return {"embeddings": emb}


def _lm_side(model: nn.Module, windows: list[list[int]], batch_size: int, base_of: bool, console: Any,
             label: str) -> dict[str, Any]:
    steps = sum(math.ceil(n / batch_size) for n in _group_sizes(windows))
    with _running(model, base_of) as running, _bar(console, steps, label) as bar:
        loss, tokens = lm_loss(running, windows, batch_size, bar)
    return {"loss_sum": loss, "tokens": tokens}


def _group_sizes(windows: list[list[int]]) -> list[int]:
    sizes: dict[int, int] = {}
    for w in windows:
        sizes[len(w)] = sizes.get(len(w), 0) + 1
    return list(sizes.values())


def _bar(console: Any, steps: int, label: str) -> Any:
    return console.progress(steps, label, lines=False) if console is not None else nullcontext(None)


def _similarities(emb: torch.Tensor, pairs: Iterable[tuple[int, int, float]]) -> list[float]:
    pairs = list(pairs)
    if not pairs:
        return []
    a = emb[[p[0] for p in pairs]]
    b = emb[[p[1] for p in pairs]]
    return F.cosine_similarity(a, b, dim=1).tolist()


def _encoder_result(before: dict[str, Any], after: dict[str, Any], reference: Reference) -> dict[str, Any]:
    cosine = float(F.cosine_similarity(before["embeddings"], after["embeddings"], dim=1).mean())
    rho_before = spearman(_similarities(before["embeddings"], reference.pairs), reference.scores)
    rho_after = spearman(_similarities(after["embeddings"], reference.pairs), reference.scores)
    change = rho_after - rho_before if rho_before is not None and rho_after is not None else None
    return {"forgetting": 1.0 - cosine, "kind": ENCODER, "cosine": cosine, "spearman_before": rho_before,
            "spearman_after": rho_after, "spearman_change": change, "sentences": len(reference.sentences),
            "pairs": len(reference.pairs), "reference": reference.source}


def _lm_result(before: dict[str, Any], after: dict[str, Any], reference: Reference, window: int) -> dict[str, Any]:
    tokens = before["tokens"]
    mean_before, mean_after = before["loss_sum"] / tokens, after["loss_sum"] / tokens
    return {"forgetting": math.expm1(mean_after - mean_before), "kind": CAUSAL_LM,
            "perplexity_before": _exp(mean_before), "perplexity_after": _exp(mean_after),
            "tokens": tokens, "window": window, "reference": reference.source}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def measure(base: nn.Module, adapted: nn.Module, tokenizer: Any, kind: str,
            reference: str | os.PathLike | Reference | None = None, batch_size: int = 32,
            device: str | torch.device | None = None, console: Any = None) -> dict[str, Any]:
    """Forgetting of ``adapted`` against ``base`` on the reference data (module docstring).

    ``base`` is the model before training: pass the float model for a QLoRA one; pass
    ``adapted`` itself to use it with its adapters disabled (``peftkit.disabled``), which is the
    base only when the adapter's initialisation did not rewrite the base weights. ``device``:
    move both models there first; None leaves them where they are. Returns, for ``"encoder"``,
    ``{"forgetting", "kind", "cosine", "spearman_before", "spearman_after", "spearman_change",
    "sentences", "pairs", "reference"}`` (the Spearman figures None without graded pairs); for
    ``"causal-lm"``, ``{"forgetting", "kind", "perplexity_before", "perplexity_after", "tokens",
    "window", "reference"}``.
    """
    _check_kind(kind)
    _check_batch_size(batch_size)
    ref = _as_reference(reference, kind)
    if device is not None:
        for model in {id(base): base, id(adapted): adapted}.values():
            model.to(torch.device(device))
    return _compare(lambda: adapted, lambda: base, tokenizer, kind, ref, batch_size, console,
                    base_is_trained=base is adapted)


def _compare(load_trained: Callable[[], nn.Module], load_base: Callable[[], nn.Module], tokenizer: Any, kind: str,
             ref: Reference, batch_size: int, console: Any, base_is_trained: bool = False) -> dict[str, Any]:
    """The trained side, then the base side (each model loaded only when its turn comes, so a
    run's two models are never in memory together), then the figures. The causal-LM windows
    are sized for the trained model (its virtual tokens take positions too)."""
    trained = load_trained()
    if kind == ENCODER:
        _need(ref.sentences, ref, "sentences")
        after = _encoder_side(trained, tokenizer, ref, batch_size, False, console, "forgetting: trained")
    else:
        window = _window_size(trained)
        windows = _windows(_token_ids(tokenizer, ref.text), window)
        _need(windows, ref, "tokens (two at least)")
        after = _lm_side(trained, windows, batch_size, False, console, "forgetting: trained")
    del trained
    base = load_base()
    if kind == ENCODER:
        before = _encoder_side(base, tokenizer, ref, batch_size, base_is_trained, console, "forgetting: base")
        return _encoder_result(before, after, ref)
    before = _lm_side(base, windows, batch_size, base_is_trained, console, "forgetting: base")
    return _lm_result(before, after, ref, window)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, found {batch_size!r}")


def _need(items: Sequence[Any], ref: Reference, what: str) -> None:
    if not items:
        raise DataError(f"{ref.source}: no {what} to measure forgetting on")


# -- a run directory -----------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    from .train import rundir

    if not path.is_file():
        return {}
    if path.name == rundir.ARGS_FILE:
        return rundir.read_train_args(path.parent)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _full_run(run_dir: Path) -> Path | None:
    """The ``model/`` directory of a full fine-tuning run (``run_dir/model``, or ``run_dir``
    itself when it is that directory), None for an adapter run."""
    from .train import rundir

    if (run_dir / rundir.CONFIG_FILE).is_file() or (run_dir / rundir.ADAPTER_DIR / rundir.CONFIG_FILE).is_file():
        return None
    if (run_dir / FULL_MODEL_DIR / "config.json").is_file():
        return run_dir / FULL_MODEL_DIR
    if (run_dir / "config.json").is_file() and ((run_dir / rundir.ARGS_FILE).is_file()
                                                or _read_json(run_dir.parent / "summary.json").get("method") == "full"):
        return run_dir
    return None


def measure_run(run_dir: str | os.PathLike, reference: str | os.PathLike | Reference | None = None,
                device: str | torch.device | None = None, batch_size: int = 32, *, model: str | None = None,
                allow_pickle: bool = False, console: Any = None) -> dict[str, Any]:
    """``measure`` on a run directory (or an adapter directory): its float base model against
    the trained model as the run uses it — ``adapter/`` loaded into the base rebuilt as in
    training (4-bit for QLoRA), or the full fine-tuning run's ``model/``.

    The base is the run's (``train_args.json``, ``summary.json``'s ``model_path``), or ``model``;
    ``device`` None: CUDA when available. The two models are loaded one after the other.
    """
    from .train.models import load_tokenizer, resolve_device

    _check_batch_size(batch_size)
    run_dir = Path(run_dir)
    dev = torch.device(device) if device is not None else resolve_device(None)
    full = _full_run(run_dir)
    if full is not None:
        kind, base_path, load_trained, load_base = _full_loaders(run_dir, full, model, dev)
    else:
        kind, base_path, load_trained, load_base = _adapter_loaders(run_dir, model, dev, allow_pickle)
    ref = _as_reference(reference, kind)
    tokenizer = load_tokenizer(base_path)
    if console is not None:
        console.info(f"forgetting: {ref.source} on {base_path} (base) and {full or run_dir} (trained)")
    return _compare(load_trained, load_base, tokenizer, kind, ref, batch_size, console)


def _adapter_loaders(run_dir: Path, model: str | None, device: torch.device, allow_pickle: bool):
    from .train.adapted import load_adapted, resolve
    from .train.models import load_sequence_classifier, load_tokenizer

    source = resolve(run_dir, model, allow_pickle)
    if getattr(source, "full", False):  # resolve took it for a full run's model/: the base is not in it
        return _full_loaders(run_dir, Path(source.adapter_dir), model, device)
    kind = kind_of_task(source.task)
    if kind == ENCODER:
        id2label = dict(source.labels().config_names.id2label)

        def build(src: Any) -> nn.Module:
            return load_sequence_classifier(src.model_path, id2label, device)
    else:
        from .train.causal_lm import load_causal_lm

        def build(src: Any) -> nn.Module:
            return load_causal_lm(src.model_path, device, load_tokenizer(src.model_path))

    def trained() -> nn.Module:
        return load_adapted(source, None, device, build, allow_pickle=allow_pickle).model

    return kind, source.model_path, trained, lambda: build(source).eval()


def _full_loaders(run_dir: Path, model_dir: Path, model: str | None, device: torch.device):
    from .train import rundir
    from .train.models import load_sequence_classifier, load_tokenizer, resolve_model

    top = model_dir.parent
    summary = _read_json(top / "summary.json")
    args = _read_json(model_dir / rundir.ARGS_FILE) or _read_json(top / rundir.ARGS_FILE)
    if model:
        base_path = resolve_model(model)
    elif summary.get("model_path"):
        base_path = resolve_model(str(summary["model_path"]))
    elif args.get("model"):
        base_path = resolve_model(str(args["model"]))
    else:
        raise ConfigError(f"{top}: neither summary.json ('model_path') nor {rundir.ARGS_FILE} ('model') says which "
                          "model the run started from; pass --model with the base model's directory")
    task = summary.get("task") or args.get("task") or _task_from_config(model_dir)
    kind = kind_of_task(str(task))
    if kind == ENCODER:
        from transformers import AutoConfig

        labels = AutoConfig.from_pretrained(model_dir).id2label or {0: "LABEL_0"}
        id2label = {int(k): str(v) for k, v in labels.items()}

        def trained() -> nn.Module:
            return load_sequence_classifier(str(model_dir), id2label, device).eval()

        def base() -> nn.Module:
            return load_sequence_classifier(base_path, id2label, device).eval()
    else:
        from .train.causal_lm import load_causal_lm

        def trained() -> nn.Module:
            return load_causal_lm(str(model_dir), device, load_tokenizer(base_path)).eval()

        def base() -> nn.Module:
            return load_causal_lm(base_path, device, load_tokenizer(base_path)).eval()

    return kind, base_path, trained, base


def _task_from_config(model_dir: Path) -> str:
    config = _read_json(model_dir / "config.json")
    names = " ".join(map(str, config.get("architectures") or ()))
    if "ForCausalLM" in names or "LMHead" in names:
        return "causal-lm"
    if "ForSequenceClassification" in names:
        return "classify"
    raise ConfigError(f"{model_dir / 'config.json'}: cannot tell the run's task (architectures: {names or 'none'}) "
                      "and its summary.json does not say")


# -- the report ----------------------------------------------------------------------------


def lines(result: dict[str, Any]) -> list[str]:
    """The readable block ``peftkit eval --forgetting`` prints (and ``compare`` may)."""
    value = result["forgetting"]
    shown = f"{value:.2e}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"
    head = f"forgetting: {shown} ({result['kind']}, reference: {result.get('reference', '?')})"
    if result["kind"] == ENCODER:
        out = [head, f"  cosine(base, trained), mean over {result['sentences']} sentences: {result['cosine']:.6f} "
                     "(forgetting = 1 - cosine)"]
        if result["spearman_before"] is None or result["spearman_after"] is None:
            out.append(f"  spearman: none ({result['pairs']} graded pairs, or constant similarities)")
        else:
            out.append(f"  spearman rho (similarity vs grade, {result['pairs']} pairs): "
                       f"{result['spearman_before']:.4f} before, {result['spearman_after']:.4f} after "
                       f"(change {result['spearman_change']:+.4f})")
        return out
    return [head, f"  perplexity on {result['tokens']} tokens (windows of {result.get('window', '?')}): "
                  f"{result['perplexity_before']:.4f} before, {result['perplexity_after']:.4f} after "
                  f"(forgetting = after / before - 1)"]
