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
from .train.options import FIELDS, METHOD_DEFAULTS, METHODS, SCHEDULERS, TASKS


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
@click.option("--data", help="Training data: classify: CSV/TSV with a header, or JSONL, with text (or sentence; "
              "plus text_pair for pairs) and label; causal-lm: JSONL with prompt+response, messages or text; "
              "image-classify: a folder of class folders.  [default: the bundled demo set]")
@click.option("--eval-data", help="Evaluation data, same formats.  [default: the demo's eval file; with "
              "--data, 20% of it held out (of each label's rows for classification), chosen with --seed]")
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
@click.option("--lr", type=float, help=_help("Peak learning rate (AdamW; warmup, then --scheduler).", "lr")[:-1]
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
@click.option("--task", type=click.Choice(TASKS), help="What to train for.  [default: from the data: a 'label' "
              "column -> classify; prompt/response, messages or text -> causal-lm; a folder of class folders -> "
              "image-classify]")
@click.option("--packing/--no-packing", default=None, help="causal-lm: pack short examples into full sequences "
              "(attention stays within each example).  [default: off]")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in the backward pass: less memory, about 30% more compute.")
@click.option("--grad-accum", type=int, help=_help("Micro-batches accumulated into one optimizer step.", "grad_accum"))
@click.option("--bf16/--no-bf16", default=None, help="bfloat16 autocast (mixed precision).  [default: float32]")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), help=_help("Learning-rate schedule after warmup.", "scheduler"))
@click.option("--max-grad-norm", type=float, help=_help("Gradient clipping (0: none).", "max_grad_norm"))
@click.option("--eval-steps", type=int, help="Evaluate every N steps.  [default: after every epoch]")
@click.option("--save-steps", type=int, help="Write a checkpoint (OUT/checkpoints/step-N) every N steps.  "
              "[default: none]")
@click.option("--save-limit", type=int, help="Keep only the N most recent checkpoints.  [default: all]")
@click.option("--keep-best/--no-keep-best", default=None, help="adapter/ holds the best evaluated adapter, not the last.")
@click.option("--early-stopping", type=int, help="Stop after N evaluations without improvement.")
@click.option("--nproc", type=int, help="Train data-parallel in N processes on this machine (torchrun, DDP).  "
              "[default: 1]")
@click.option("--fsdp/--no-fsdp", default=None, help="Shard the model across the processes (FSDP).")
@click.option("--tensorboard/--no-tensorboard", default=None, help="Also log to OUT/tensorboard.")
@click.option("--resume", "resume_dir", help="Continue the run in this directory from its latest checkpoint, "
              "with its saved options.")
@_common
@_guarded
def train(config_file: str | None, resume_dir: str | None, debug: bool, **flags: Any) -> None:
    """Train an adapter and evaluate it before and after.

    With no arguments: LoRA on the bundled MiniLM and demo data (text classification).
    """
    from .train.distributed import launch, under_torchrun
    from .train.engine import read_run_options, run_training
    from .train.options import build_options, read_yaml
    from .train.progress import Console

    ctx = click.get_current_context()
    given = {name: value for name, value in flags.items()
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    if resume_dir is not None:
        extra = sorted(set(given) - RESUME_FLAGS) + (["config"] if config_file else [])
        if extra:
            raise click.UsageError(f"--resume continues a run with its saved options; drop "
                                   f"{', '.join('--' + e.replace('_', '-') for e in extra)}")
        options = read_run_options(resume_dir)
        options.quiet = bool(given.get("quiet", options.quiet))
        options.nproc = given.get("nproc") or options.nproc
        options.device = given.get("device") or options.device
    else:
        file_values = read_yaml(config_file) if config_file else {}
        options = build_options(file_values, given, source=config_file or "")
    if options.nproc > 1 and not under_torchrun():
        args = (["train", "--resume", resume_dir] + (["--device", options.device] if options.device else [])
                if resume_dir else ["train", "--config", _launch_config(options)])
        status = launch(options.nproc, args + (["--quiet"] if options.quiet else []) + (["--debug"] if debug else []))
        if status != 0:
            raise click.ClickException(f"training in {options.nproc} processes failed (exit status {status})")
        return
    run_training(options, Console(quiet=options.quiet), resume=resume_dir is not None)


RESUME_FLAGS = {"quiet", "nproc", "device"}


def _launch_config(options: Any) -> str:
    """The options as a YAML file for the processes torchrun starts (kept in the run directory)."""
    import yaml

    from .train.rundir import default_out

    options.out = options.out or default_out(options.method)
    os.makedirs(options.out, exist_ok=True)
    path = os.path.join(options.out, "launch.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(options.to_dict(), f, sort_keys=False)
    return path


@cli.command("eval")
@click.option("--model", help="The base model: a local directory or 'minilm'.  [default: the one the "
              "adapter was trained on]")
@click.option("--adapter", required=True, help="An adapter directory or a run directory (holding adapter/).")
@click.option("--data", help="Data to evaluate on, in the run's format (a CSV/TSV/JSONL file, or an image folder).  "
              "[default: the run's evaluation data]")
@click.option("--batch-size", type=int, help="[default: the training batch size]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cuda when available, else cpu]")
@_common
@_guarded
def eval_(model: str | None, adapter: str, data: str | None, batch_size: int | None, device: str | None,
          quiet: bool, debug: bool) -> None:
    """Evaluate a trained adapter; prints one JSON line of metrics (classify, image-classify:
    {"accuracy", "loss", "n"}; causal-lm: {"loss", "perplexity", "tokens", "n"})."""
    from .train.models import resolve_device
    from .train.progress import Console

    if batch_size is not None and batch_size < 1:
        raise click.BadParameter(f"expected a positive integer, found {batch_size}", param_hint="--batch-size")
    result = _task_module(adapter).evaluate_adapter(adapter, model, data, batch_size, resolve_device(device),
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
    from .train.progress import Console

    console = Console(quiet=quiet)
    module = _task_module(adapter)
    out_dir = module.merge_adapter(adapter, model, out, console, quantized)
    console.essential(f"merged model: {out_dir} (load it with {module.AUTO_CLASS}.from_pretrained)")


def _task_module(adapter: str):
    """The module of the task an adapter was trained for (train_args.json; classify if unknown)."""
    from .train.rundir import find_adapter_dir, read_train_args
    from .train.tasks import MODULES, module_of

    task = read_train_args(find_adapter_dir(adapter)).get("task") or "classify"
    if task == "SEQ_CLS":  # train_args.json of peftkit 0.1 runs
        task = "classify"
    if task not in MODULES:
        raise click.ClickException(f"{adapter}: trained for task {task!r}, which this peftkit does not know")
    return module_of(task)


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
