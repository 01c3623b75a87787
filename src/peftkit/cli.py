"""The ``peftkit`` command: ``train``, ``eval``, ``merge``, ``info``.

A thin layer over ``peftkit.train``: it parses flags, merges a YAML file under them, and turns
every ``PeftkitError`` into one line on stderr with exit status 1 (a traceback only with
``--debug``). See docs/cli.md.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local directories only

import click
from click.core import ParameterSource

from . import __version__
from .errors import PeftkitError
from .train.options import FIELDS, METHOD_DEFAULTS, METHODS


def _quiet_libraries(debug: bool) -> None:
    """transformers' load reports and progress bars are noise for a CLI user, except when debugging."""
    if debug:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; a peftkit error (or an OS error such as an unwritable --out) becomes
    ``Error: <message>`` and exit status 1, unless ``--debug`` asks for the traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        _quiet_libraries(debug)
        try:
            return fn(*args, **kwargs)
        except PeftkitError as exc:
            if debug:
                raise
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if debug:
                raise
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None

    return wrapper


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--debug", is_flag=True, help="Show tracebacks and library logs.")(fn)
    fn = click.option("--quiet", "-q", is_flag=True, help="Only essential lines; no progress.")(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="peftkit")
def cli() -> None:
    """peftkit: parameter-efficient fine-tuning (LoRA) with files HF PEFT can load.

    Run `peftkit train` with no arguments for the demo: LoRA on the bundled all-MiniLM-L6-v2,
    classifying the bundled three-topic sentence set.
    """


def _help(text: str, field: str) -> str:
    """A flag's help with its default taken from ``TrainOptions``."""
    default = FIELDS[field].default
    return f"{text}  [default: {default}]" if default is not None else text


@cli.command()
@click.option("--model", help=_help("A local transformers model directory, or 'minilm' (bundled).", "model"))
@click.option("--data", help="Training data: CSV/TSV with a header, or JSONL; columns text (or sentence) "
              "and label.  [default: the bundled demo set]")
@click.option("--eval-data", help="Evaluation data, same formats.  [default: the demo's eval file; with "
              "--data, 20% of each label's rows held out (chosen with --seed)]")
@click.option("--method", type=click.Choice(METHODS), help=_help("Adapter method (dora: LoRA with DoRA's "
              "magnitude vector; qlora: LoRA over a 4-bit NF4 base; ia3: (IA)³ scaling vectors; adapter: Houlsby bottleneck adapters; prompt, ptuning, prefix: prompt tuning, P-tuning, prefix tuning).", "method"))
@click.option("--virtual-tokens", type=int, help=_help("Virtual tokens (prompt, ptuning, prefix).", "virtual_tokens"))
@click.option("--r", type=int, help=_help("LoRA rank.", "r"))
@click.option("--alpha", type=float, help=_help("LoRA alpha (scaling = alpha / r).", "alpha"))
@click.option("--dropout", type=float, help=_help("Dropout on the LoRA input.", "dropout"))
@click.option("--targets", help="Modules to adapt: a comma list (query,value), a regex over full "
              "module names, or all-linear.  [default: the method's default for the model type]")
@click.option("--epochs", type=int, help=_help("Passes over the training data.", "epochs"))
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=int, help=_help("Examples per step (and per eval batch).", "batch_size"))
@click.option("--lr", type=float, help=_help("Peak learning rate (AdamW, linear warmup and decay).", "lr")[:-1]
              + "".join(f"; {m} {d['lr']:g}" for m, d in METHOD_DEFAULTS.items()) + "]")
@click.option("--warmup-ratio", type=float, help=_help("Fraction of the steps spent warming up.", "warmup_ratio"))
@click.option("--weight-decay", type=float, help=_help("AdamW weight decay on adapter matrices.", "weight_decay"))
@click.option("--max-length", type=int, help=_help("Tokens per example; longer texts are truncated.", "max_length"))
@click.option("--seed", type=int, help=_help("Seed for torch, random, shuffling and the hold-out split.", "seed"))
@click.option("--out", help="Run directory.  [default: runs/<method>-<YYYYmmdd>-<HHMMSS>]")
@click.option("--config", "config_file", type=str, help="YAML file of options (keys: the long flag names); "
              "flags given here override it.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cuda when available, else cpu]")
@click.option("--quantize", type=click.Choice(["nf4", "fp4"]), help="Store the base in 4 bits (bitsandbytes) "
              "under any weight-side method.  [default: nf4 with --method qlora, else none]")
@_common
@_guarded
def train(config_file: str | None, debug: bool, **flags: Any) -> None:
    """Train an adapter for text classification and evaluate it before and after.

    With no arguments: LoRA on the bundled MiniLM and demo data.
    """
    from .train.classify import train_classifier
    from .train.options import build_options, read_yaml
    from .train.progress import Console

    ctx = click.get_current_context()
    given = {name: value for name, value in flags.items()
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    file_values = read_yaml(config_file) if config_file else {}
    options = build_options(file_values, given, source=config_file or "")
    train_classifier(options, Console(quiet=options.quiet))


@cli.command("eval")
@click.option("--model", help="The base model: a local directory or 'minilm'.  [default: the one the "
              "adapter was trained on]")
@click.option("--adapter", required=True, help="An adapter directory or a run directory (holding adapter/).")
@click.option("--data", help="CSV/TSV/JSONL file to evaluate on.  [default: the run's evaluation data]")
@click.option("--batch-size", type=int, help="[default: the training batch size]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cuda when available, else cpu]")
@_common
@_guarded
def eval_(model: str | None, adapter: str, data: str | None, batch_size: int | None, device: str | None,
          quiet: bool, debug: bool) -> None:
    """Evaluate a trained adapter; prints one JSON line: {"accuracy", "loss", "n"}."""
    from .train.classify import evaluate_adapter
    from .train.models import resolve_device
    from .train.progress import Console

    if batch_size is not None and batch_size < 1:
        raise click.BadParameter(f"expected a positive integer, found {batch_size}", param_hint="--batch-size")
    result = evaluate_adapter(adapter, model, data, batch_size, resolve_device(device),
                              Console(quiet=quiet, to_stderr=True))
    click.echo(json.dumps(result))


@cli.command()
@click.option("--model", help="The base model: a local directory or 'minilm'.  [default: the one the "
              "adapter was trained on]")
@click.option("--adapter", required=True, help="An adapter directory or a run directory (holding adapter/).")
@click.option("--out", required=True, help="Directory for the merged transformers model.")
@click.option("--quantized", is_flag=True, help="The adapter was trained over a 4-bit NF4 base: merge into the "
              "dequantized weights and write a dense model.  [default: as the run's options say]")
@_common
@_guarded
def merge(model: str | None, adapter: str, out: str, quantized: bool, quiet: bool, debug: bool) -> None:
    """Fold an adapter into its base model and save a plain transformers model directory."""
    from .train.classify import merge_adapter
    from .train.progress import Console

    console = Console(quiet=quiet)
    out_dir = merge_adapter(adapter, model, out, console, quantized)
    console.essential(f"merged model: {out_dir} (load it with AutoModelForSequenceClassification.from_pretrained)")


@cli.command()
@click.argument("directory")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guarded
def info(directory: str, debug: bool) -> None:
    """Describe an adapter (or the adapter of a run directory)."""
    from .train.rundir import adapter_facts, find_adapter_dir

    facts = adapter_facts(find_adapter_dir(directory))
    width = max(len(label) for label, _ in facts)
    for label, value in facts:
        click.echo(f"{label + ':':<{width + 1}} {value}")


@cli.command()
@click.option("--model", help="The base model: a local directory.  [default: the one the adapter was trained on]")
@click.option("--adapter", required=True, help="A causal-LM adapter directory or a run directory (holding adapter/).")
@click.option("--prompt", "prompt_texts", multiple=True, help="A prompt (repeat for several).")
@click.option("--prompts", "prompts_file", help="A file of prompts: JSONL with {\"prompt\": ...} per line, or "
              "plain text with one prompt per line.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--sample", is_flag=True, help="Sample (with --temperature, --top-p, --top-k, --seed) instead of "
              "greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling: keep this much "
              "probability mass.")
@click.option("--top-k", type=int, default=50, show_default=True, help="Sample among the k likeliest tokens (0: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--chat", is_flag=True, help="Render each prompt as one user message in the chat format `messages` "
              "data trains with (the tokenizer's chat template, else peftkit's fallback format).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per generate call "
              "(left-padded).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cuda when available, else cpu]")
@_common
@_guarded
def generate(model: str | None, adapter: str, prompt_texts: tuple[str, ...], prompts_file: str | None,
             max_new_tokens: int, sample: bool, temperature: float, top_p: float, top_k: int, seed: int, chat: bool,
             batch_size: int, device: str | None, quiet: bool, debug: bool) -> None:
    """Complete prompts with a causal LM and its adapter; prints one JSON line per prompt:
    {"prompt", "completion"} (progress goes to stderr). Greedy unless --sample."""
    from .train.generate import generate as run_generate, read_prompts
    from .train.models import resolve_device
    from .train.progress import Console

    if bool(prompt_texts) == bool(prompts_file):
        raise click.UsageError("give prompts with --prompt TEXT (repeatable) or --prompts FILE, not both")
    prompts = list(prompt_texts) if prompt_texts else read_prompts(prompts_file)
    results = run_generate(model, adapter, prompts, max_new_tokens=max_new_tokens, do_sample=sample,
                           temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                           device=resolve_device(device), console=Console(quiet=quiet, to_stderr=True), chat=chat,
                           batch_size=batch_size)
    for result in results:
        click.echo(json.dumps(result, ensure_ascii=False))


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="peftkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
