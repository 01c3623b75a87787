"""The ``peftkit`` command: ``train``, ``eval``, ``merge``, ``info``.

A thin layer over ``peftkit.train``: it parses flags, merges a YAML file under them, and turns
every exception (a ``PeftkitError``, or one from a dependency) into one line on stderr with exit
status 1, Ctrl-C into exit status 130 (a traceback only with ``--debug``). See docs/cli.md.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
import warnings
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local directories only

import click
from click.core import ParameterSource

from . import __version__
from .errors import PeftkitError, PeftkitWarning
from .train.options import (CLI_METHODS, FIELDS, FULL, FULL_HELP, METHOD_DEFAULTS, METHOD_OPTIONS, METHODS,
                            SCHEDULERS, TASKS)


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
    """Run a command; whatever goes wrong is one line on stderr and exit status 1, unless
    ``--debug`` asks for the traceback:

    - a peftkit error (bad input, a broken file): ``Error: <message>``;
    - any other exception (from torch, transformers, bitsandbytes, safetensors, PIL, the OS, or
      a peftkit bug): ``Error: peftkit <command>: <Type> from <module>[: <file>]: <message> (rerun
      with --debug for the traceback)``, the module being where it was raised (``_failure_line``);
    - Ctrl-C: ``interrupted`` and exit status 130.

    click's own errors (usage: exit status 2) pass through as click reports them."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        _quiet_libraries(debug)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            click.echo(f"peftkit {_command_name(fn)}: interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except PeftkitError as exc:
            if debug:
                raise
            raise click.ClickException(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the point: no traceback for the user
            if debug:
                raise
            raise click.ClickException(_failure_line(_command_name(fn), exc)) from None

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """peftkit's own warnings as one ``Warning: ...`` line; others as Python prints them."""
    if issubclass(category, PeftkitWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _command_name(fn: Callable[..., Any]) -> str:
    ctx = click.get_current_context(silent=True)
    return (ctx.info_name if ctx is not None and ctx.info_name else fn.__name__.rstrip("_"))


def _failure_line(command: str, exc: BaseException) -> str:
    """One line for an exception that is not a ``PeftkitError``: the command, the exception's
    type and the module it came from (``_origin_module``), the file an ``OSError`` names, and
    the first line of its message."""
    module = _origin_module(exc)
    where = f" from {module}" if module else ""
    filename = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    if isinstance(exc, OSError) and exc.strerror:
        message = exc.strerror
    else:
        message = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    file_part = f": {os.fsdecode(filename)}" if filename else ""
    text = f": {message}" if message else ""
    return (f"peftkit {command}: {type(exc).__name__}{where}{file_part}{text} "
            "(rerun with --debug for the traceback)")


def _origin_module(exc: BaseException) -> str | None:
    """Where an exception came from: the module of the innermost traceback frame that is not
    peftkit's, looking first at the exception it was raised from (``raise ... from cause``,
    deepest cause first: peftkit re-raises an OS error under the file's final name), else the
    innermost peftkit module (a peftkit bug)."""
    chain = [exc]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    fallback = None
    for e in reversed(chain):
        names = []
        tb = e.__traceback__
        while tb is not None:
            names.append(tb.tb_frame.f_globals.get("__name__") or "")
            tb = tb.tb_next
        for name in reversed(names):
            if name and name != "peftkit" and not name.startswith("peftkit."):
                return name
        fallback = fallback or next((name for name in reversed(names) if name), None)
    return fallback


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


def _takes(text: str, option: str) -> str:
    """A method-specific option's help, with the methods that take it (from the registry)."""
    return f"{text} ({', '.join(m for m, names in METHOD_OPTIONS.items() if option in names)})."


def _help(text: str, field: str) -> str:
    """A flag's help with its default taken from ``TrainOptions``, and the methods' own defaults
    for it (the registry's ``CliMethod.defaults``)."""
    default = FIELDS[field].default
    if default is None:
        return text
    own = "".join(f"; {m} {d[field]:g}" if isinstance(d[field], float) else f"; {m} {d[field]}"
                  for m, d in METHOD_DEFAULTS.items() if field in d)
    return f"{text}  [default: {default:g}{own}]" if isinstance(default, float) else f"{text}  [default: {default}{own}]"


@cli.command()
@click.option("--model", help=_help("A local transformers model directory, or 'minilm' (bundled).", "model"))
@click.option("--data", help="Training data: classify: CSV/TSV with a header, or JSONL, with text (or sentence; "
              "plus text_pair for pairs) and label; causal-lm: JSONL with prompt+response, messages or text; "
              "image-classify: a folder of class folders.  [default: the bundled demo set]")
@click.option("--eval-data", help="Evaluation data, same formats.  [default: the demo's eval file; with "
              "--data, 20% of it held out (of each label's rows for classification), chosen with --seed]")
@click.option("--method", type=click.Choice(METHODS), help=_help(
    "Adapter method: " + "; ".join(f"{name}: {entry.help}" for name, (_, entry) in CLI_METHODS.items())
    + f"; or {FULL}: {FULL_HELP}.", "method"))
@click.option("--virtual-tokens", type=int, help=_help(_takes("Virtual tokens", "virtual_tokens"), "virtual_tokens"))
@click.option("--r", type=int, help=_help(_takes("Rank", "r"), "r"))
@click.option("--alpha", type=float, help=_help(_takes("Alpha (scaling = alpha / r)", "alpha"), "alpha"))
@click.option("--dropout", type=float, help=_help(_takes("Dropout (LoRA's input, the bottleneck's hidden layer, LoHa's "
                                                        "and LoKr's rank dropout)", "dropout"), "dropout"))
@click.option("--targets", help=_takes("Modules to adapt: a comma list (query,value), a regex over full "
              "module names, or all-linear", "targets") + "  [default: the method's default for the model type]")
@click.option("--init", help=_takes("How LoRA's A and B start: default (B = 0), gaussian, pissa / pissa_niter_N "
              "(principal singular vectors; the base keeps the residual), olora (QR), orthogonal (B·A = 0), "
              "loftq (--method qlora: the 4-bit base and the adapter fitted to the float weights together), "
              "eva (A from the principal directions of each layer's inputs on the first training batches, "
              "ranks redistributed by explained variance)",
              "init") + "  [default: default]")
@click.option("--epochs", type=int, help=_help("Passes over the training data.", "epochs"))
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=int, help=_help("Examples per step (and per eval batch).", "batch_size"))
@click.option("--lr", type=float, help=_help("Peak learning rate (AdamW; warmup, then --scheduler).", "lr"))
@click.option("--loraplus-lr-ratio", type=float, help=_takes("LoRA+: LoRA's B matrices train at this times --lr "
              "(A, the head and biases at --lr), e.g. 16", "loraplus_lr_ratio"))
@click.option("--lora-fa/--no-lora-fa", default=None, help=_takes("LoRA-FA: A stays at its initial value and only B "
              "trains, its gradient projected as by HF PEFT's LoRA-FA optimizer", "lora_fa"))
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
        changed = {k: given[k] for k in sorted(RESUME_OVERRIDES) if k in given and given[k] != getattr(options, k)}
        if changed:  # e.g. after a run whose loss became NaN: a lower --lr, clipping, no bf16
            from pathlib import Path

            from .train.engine import OPTIONS_FILE
            from .train.report import write_json

            saved = {k: getattr(options, k) for k in changed}
            for k, v in changed.items():
                setattr(options, k, v)
            options.validate()
            path = Path(resume_dir) / OPTIONS_FILE  # recorded: a later --resume keeps them
            write_json(path, {**json.loads(path.read_text(encoding="utf-8")), **changed})
            console = Console(quiet=options.quiet)
            for k, v in changed.items():
                console.essential(f"{_flag_text(k, v)} overrides the saved {_flag_text(k, saved[k])} "
                                  f"(recorded in {path})")
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


RESUME_OVERRIDES = {"lr", "max_grad_norm", "bf16"}  # --resume may change these saved options
RESUME_FLAGS = {"quiet", "nproc", "device"} | RESUME_OVERRIDES


def _flag_text(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + name.replace("_", "-")
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


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


_ALLOW_PICKLE_HELP = ("Read the weights from adapter_model.bin, a pickle, when there is no "
                      "adapter_model.safetensors (with torch.load(weights_only=True), which accepts tensors only); "
                      "only for files you trust.  [default: refused]")


def _allow_pickle(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--allow-pickle", is_flag=True, help=_ALLOW_PICKLE_HELP)(fn)


@cli.command("eval")
@click.option("--model", help="The base model: a local directory or 'minilm'.  [default: the one the "
              "adapter was trained on: train_args.json, else the adapter config's base_model_name_or_path]")
@click.option("--adapter", required=True, help="An adapter directory (peftkit's, or any HF PEFT can load) or a "
              "run directory (holding adapter/).")
@click.option("--data", help="Data to evaluate on, in the run's format (a CSV/TSV/JSONL file, or an image folder).  "
              "[default: the run's evaluation data]")
@click.option("--batch-size", type=int, help="[default: the training batch size]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cuda when available, else cpu]")
@click.option("--forgetting", is_flag=True, help="Also measure how much training changed the base model on "
              "unrelated reference data (docs/forgetting.md): classify: 1 - mean cosine of sentence embeddings and "
              "the Spearman rho change; causal-lm: the relative change of perplexity.")
@click.option("--reference", help="With --forgetting: the reference data, a JSONL file of {\"sentence1\", "
              "\"sentence2\", \"score\" 0-5} rows or a text file.  [default: the bundled set]")
@_allow_pickle
@_common
@_guarded
def eval_(model: str | None, adapter: str, data: str | None, batch_size: int | None, device: str | None,
          forgetting: bool, reference: str | None, allow_pickle: bool, quiet: bool, debug: bool) -> None:
    """Evaluate a trained adapter; prints one JSON line of metrics (classify, image-classify:
    {"accuracy", "loss", "n", "labels_from"}; causal-lm: {"loss", "perplexity", "tokens", "n"}),
    with --forgetting also {"forgetting": {...}}."""
    from .train.adapted import resolve
    from .train.models import resolve_device
    from .train.progress import Console
    from .train.tasks import module_of

    if batch_size is not None and batch_size < 1:
        raise click.BadParameter(f"expected a positive integer, found {batch_size}", param_hint="--batch-size")
    if reference is not None and not forgetting:
        raise click.BadParameter("given without --forgetting", param_hint="--reference")
    console = Console(quiet=quiet, to_stderr=True)
    source = resolve(adapter, model, allow_pickle)
    if forgetting:  # a task or reference it cannot measure is refused before the evaluation runs
        from . import forgetting as forgetting_

        forgetting_.load_reference(reference, forgetting_.kind_of_task(source.task))
    result = module_of(source.task).evaluate_adapter(source, model, data, batch_size, resolve_device(device), console)
    if forgetting:
        figures = forgetting_.measure_run(adapter, reference, resolve_device(device), batch_size or 32, model=model,
                                          allow_pickle=allow_pickle, console=console)
        for line in forgetting_.lines(figures):
            console.essential(line)
        result["forgetting"] = figures
    click.echo(json.dumps(result))


@cli.command()
@click.option("--model", help="The base model: a local directory or 'minilm'.  [default: the one the "
              "adapter was trained on: train_args.json, else the adapter config's base_model_name_or_path]")
@click.option("--adapter", required=True, help="An adapter directory (peftkit's, or any HF PEFT can load) or a "
              "run directory (holding adapter/).")
@click.option("--out", required=True, help="Directory for the merged transformers model (written as a whole: "
              "new, empty, or a model directory merge wrote before).")
@click.option("--quantized", is_flag=True, help="The adapter was trained over a 4-bit NF4 base: merge into the "
              "dequantized weights and write a dense model.  [default: as the run's options say]")
@_allow_pickle
@_common
@_guarded
def merge(model: str | None, adapter: str, out: str, quantized: bool, allow_pickle: bool, quiet: bool,
          debug: bool) -> None:
    """Fold an adapter into its base model and save a plain transformers model directory."""
    from .train.adapted import resolve
    from .train.progress import Console
    from .train.tasks import module_of

    console = Console(quiet=quiet)
    source = resolve(adapter, model, allow_pickle)
    source.check_mergeable()  # a full fine-tuning run: a whole model already
    module = module_of(source.task)
    out_dir = module.merge_adapter(source, model, out, console, quantized)
    console.essential(f"merged model: {out_dir} (load it with {module.AUTO_CLASS}.from_pretrained)")


@cli.command()
@click.argument("directory")
@_allow_pickle
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guarded
def info(directory: str, allow_pickle: bool, debug: bool) -> None:
    """Describe an adapter (or the adapter of a run directory)."""
    from .train.rundir import adapter_facts, find_adapter_dir

    facts = adapter_facts(find_adapter_dir(directory), allow_pickle)
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
@_allow_pickle
@_common
@_guarded
def generate(model: str | None, adapter: str, prompt_texts: tuple[str, ...], prompts_file: str | None,
             max_new_tokens: int, sample: bool, temperature: float, top_p: float, top_k: int, seed: int, chat: bool,
             batch_size: int, device: str | None, allow_pickle: bool, quiet: bool, debug: bool) -> None:
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
                           batch_size=batch_size, allow_pickle=allow_pickle)
    for result in results:
        click.echo(json.dumps(result, ensure_ascii=False))


# The tools built on the trainer, each in its own module (imported after ``cli`` exists: they
# decorate their commands with this module's helpers).
from .compare.cli import compare as _compare  # noqa: E402
from .plan_cli import plan as _plan  # noqa: E402

cli.add_command(_compare)
cli.add_command(_plan)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="peftkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
