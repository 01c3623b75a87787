"""Causal-LM instruction tuning: the ``causal-lm`` task of ``peftkit train``, and its eval and merge.

Data: a JSONL file of ``prompt``/``response``, ``messages`` or ``text`` lines (``lm_data``
describes the forms, the loss masks, truncation and packing). ``--data`` is required;
without ``--eval-data`` a fraction (``HOLDOUT_FRACTION``) of its examples, chosen with
``--seed``, is held out for evaluation.

Model: ``AutoModelForCausalLM`` from a local directory, in float32; a decoder (causal
attention) is required. Loss: the model's mean cross-entropy over predicted tokens, so
``count`` is the number of predicted tokens (labels other than -100 after the first column,
as transformers' ``ForCausalLMLoss`` shifts them). Metrics: mean token loss and perplexity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import ConfigError, ModelError
from .adapted import Adapted, Source, eval_data_of, load_adapted, merged_model, write_out_dir
from .data import HOLDOUT_FRACTION
from .lm_data import IGNORE_INDEX, LMCollate, build_dataset, read_lm_examples, split_holdout
from .models import check_max_length, dtype_kwargs, first_line, load_tokenizer, resolve_model
from .options import CLI_METHODS, TrainOptions
from .progress import Console
from .task import Task, TaskData

AUTO_CLASS = "AutoModelForCausalLM"  # what a merged model directory loads with


# -- model --------------------------------------------------------------------------------


def load_causal_lm(path: str, device: torch.device, tokenizer: Any = None) -> nn.Module:
    """``AutoModelForCausalLM`` from ``path`` in float32 on ``device``; ``ModelError`` if it is not
    a causal (decoder) language model. A missing ``pad_token_id`` is taken from the tokenizer."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs())
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot load a causal language model: {first_line(exc)}") from None
    if not _is_causal(model):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ModelError(f"{path}: {kind} is not a causal (decoder) language model; the causal-lm task needs one "
                         "(GPT-2, Llama, Qwen, ...)")
    if getattr(model.config, "pad_token_id", None) is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device)


def _is_causal(model: nn.Module) -> bool:
    """Decoder attention: the config says so, or an attention module is causal."""
    if getattr(model.config, "is_decoder", False):
        return True
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


# -- loss and metrics ---------------------------------------------------------------------


def predicted_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens the loss averages over, per row: labels (B, T) -> (B,). Position t predicts
    label t+1, so the first column never counts (as in transformers' ``ForCausalLMLoss``)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def token_loss_sums(model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
    """Summed token loss, token count and example count over the rows of ``batch`` where ``keep``.

    Logits are computed here (not the model's mean loss) so that ``keep`` can drop rows. The
    input methods make logits longer than the labels by their virtual tokens, (B, P+T, V);
    the last T positions are the real tokens'.
    """
    labels = batch["labels"]  # (B, T)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits[:, -labels.shape[1]:]  # (B, T, V)
        targets = labels[:, 1:]  # (B, T-1)
        losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)  # (B, T-1)
        keep = keep.to(device=labels.device, dtype=torch.bool)
        per_row = losses.sum(dim=1)  # (B,)
        tokens = predicted_tokens(labels)  # (B,)
        return {"loss_sum": float(per_row[keep].sum()), "tokens": int(tokens[keep].sum()), "n": int(keep.sum())}


def loss_metrics(sums: dict[str, float]) -> dict[str, Any]:
    """``{"loss", "perplexity", "tokens", "n"}`` from summed token losses (NaN when no tokens)."""
    tokens = int(sums.get("tokens", 0))
    loss = float(sums.get("loss_sum", 0.0)) / tokens if tokens else float("nan")
    if math.isnan(loss):
        perplexity = float("nan")
    else:
        perplexity = math.exp(loss) if loss < 700 else float("inf")  # exp overflows a float beyond ~709
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens, "n": int(sums.get("n", 0))}


# -- the task -----------------------------------------------------------------------------


class CausalLMTask(Task):
    """Instruction tuning / language modelling of a decoder on a JSONL file (``lm_data``)."""

    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    metric = "loss"
    higher_is_better = False
    holdout_fraction = HOLDOUT_FRACTION

    def __init__(self, options: TrainOptions) -> None:
        super().__init__(options)
        self.tokenizer: Any = None
        self.model_path: str | None = None

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.model_path = resolve_model(self.options.model)
            self.tokenizer = load_tokenizer(self.model_path)
        return self.tokenizer

    def load_data(self) -> TaskData:
        o = self.options
        if not o.data:
            raise ConfigError("--task causal-lm needs --data: a JSONL file with 'prompt'/'response', 'messages' "
                              "or 'text' on each line (there is no bundled causal-LM data set)")
        if o.packing and o.method in CLI_METHODS and CLI_METHODS[o.method][0].input_method:  # not full
            raise ConfigError(f"--packing does not work with --method {o.method}: the virtual tokens need a 2-D "
                              "attention mask, and packed rows use a block-diagonal 4-D one")
        tokenizer = self._tokenizer()
        train_ex = read_lm_examples(o.data)
        if o.eval_data:
            eval_ex, eval_source = read_lm_examples(o.eval_data), o.eval_data
        else:
            train_ex, eval_ex = split_holdout(train_ex, self.holdout_fraction, o.seed, o.data)
            eval_source = f"{o.data} (held-out {self.holdout_fraction:.0%})"
        train_set, train_stats = build_dataset(train_ex, tokenizer, o.max_length, o.data, o.packing)
        eval_set, eval_stats = build_dataset(eval_ex, tokenizer, o.max_length, o.eval_data or o.data, False)
        lines = [_forms_line(train_ex, tokenizer)]
        if o.packing:
            tokens = sum(len(r.input_ids) for r in train_set.rows)
            lines.append(f"packing: {train_set.examples} training examples in {len(train_set)} rows of at most "
                         f"{o.max_length} tokens ({tokens / (len(train_set) * o.max_length):.0%} filled)")
        lines += train_stats.lines(o.data, o.max_length) + eval_stats.lines(eval_source, o.max_length)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return TaskData(train_set, eval_set, LMCollate(pad), o.data, eval_source, lines,
                        train_examples=train_set.examples)

    def load_model(self, data: TaskData, device: torch.device) -> tuple[nn.Module, str]:
        tokenizer = self._tokenizer()
        model = load_causal_lm(self.model_path, device, tokenizer)
        check_max_length(model, self.options.max_length)
        return model, self.model_path

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(predicted_tokens(batch["labels"]).sum())

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        count = self.count(batch)
        loss = model(**batch).loss.float()  # mean over `count` tokens; NaN (0/0) when there are none
        return loss * count if count else torch.nan_to_num(loss, nan=0.0) * 0.0

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
        return token_loss_sums(model, batch, keep)

    def finish_eval(self, sums: dict[str, float]) -> dict[str, Any]:
        return loss_metrics(sums)

    def eval_text(self, result: dict[str, Any]) -> str:
        return eval_text(result)


def eval_text(result: dict[str, Any]) -> str:
    return (f"loss {result['loss']:.4f} (perplexity {result['perplexity']:.2f}, {result['tokens']} tokens, "
            f"n={result['n']})")


def _forms_line(examples, tokenizer) -> str:
    """``training examples: 40 prompt/response, 12 messages (chat template)``."""
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.form] = counts.get(e.form, 0) + 1
    chat = "chat template" if getattr(tokenizer, "chat_template", None) else "fallback chat format: no chat template"
    names = {"prompt": "prompt/response", "messages": f"messages ({chat})", "text": "text"}
    return "training examples: " + ", ".join(f"{counts[k]} {name}" for k, name in names.items() if k in counts)


# -- using a trained adapter --------------------------------------------------------------


def _builder(device: torch.device):
    def build(source: Source) -> nn.Module:
        return load_causal_lm(source.model_path, device, load_tokenizer(source.model_path))
    return build


def load_adapted_lm(adapter: str | Source, model: str | None, device: torch.device, quantized: bool = False,
                    allow_pickle: bool = False) -> tuple[Adapted, Any]:
    """The base causal LM with the adapter loaded, in eval mode, and its tokenizer."""
    adapted = load_adapted(adapter, model, device, _builder(device), quantized, allow_pickle)
    return adapted, load_tokenizer(adapted.model_path)


def evaluate_adapter(adapter: str | Source, model: str | None, data: str | None, batch_size: int | None,
                     device: torch.device, console: Console, allow_pickle: bool = False) -> dict[str, Any]:
    """``{"loss", "perplexity", "tokens", "n"}`` of an adapter on a causal-LM JSONL file,
    tokenized as in training (the run's ``max_length``); never packed."""
    adapted, tokenizer = load_adapted_lm(adapter, model, device, allow_pickle=allow_pickle)
    args = adapted.args
    path, held_out = eval_data_of(args, data)
    examples = read_lm_examples(path)
    if held_out:
        fraction = float(args.get("holdout_fraction") or HOLDOUT_FRACTION)
        _, examples = split_holdout(examples, fraction, int(args.get("seed") or 0), path)
    max_length = int(args.get("max_length") or TrainOptions.max_length)
    check_max_length(adapted.model, max_length)
    dataset, stats = build_dataset(examples, tokenizer, max_length, path, packing=False)
    for line in stats.lines(path, max_length):
        console.info(line)
    size = batch_size or int(args.get("batch_size") or TrainOptions.batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=LMCollate(pad))
    console.info(adapted.source.line())
    console.info(f"evaluating {adapted.adapter_dir} on {len(dataset)} examples from {path}"
                 + (" (held-out part)" if held_out else ""))
    with console.progress(len(loader), "eval", lines=False) as bar:
        return CausalLMTask(TrainOptions()).evaluate(adapted.model, loader, device, progress=bar)


def merge_adapter(adapter: str | Source, model: str | None, out: str, console: Console, quantized: bool = False,
                  allow_pickle: bool = False) -> Path:
    """Fold the adapter into its base and write a plain ``AutoModelForCausalLM`` directory with
    the tokenizer (as a whole: ``write_out_dir``). An adapter trained over a 4-bit base is merged
    into the dequantized weights and written dense (see ``adapted.load_adapted``)."""
    adapted, tokenizer = load_adapted_lm(adapter, model, torch.device("cpu"), quantized, allow_pickle)
    console.info(adapted.source.line())
    merged = merged_model(adapted, console)

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    out_dir = write_out_dir(out, fill, keep=[adapted.model_path, adapted.adapter_dir])
    console.info(f"merged {adapted.adapter_dir} into {adapted.model_path}")
    return out_dir
