"""``peftkit compare``: the click command (registered by one line at the end of ``peftkit.cli``).

This module does not import ``peftkit.cli`` when it is imported (``peftkit.cli`` imports it
while it is being set up); the shared error handling (``_guarded``: one ``Error:`` line, exit
status 1) is looked up when the command runs.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import click

METHOD_HELP = ("Comma-separated methods: any of `peftkit train --method`, and full (full fine-tuning, the "
               "reference).  [default: every method, then full]")


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..cli import _guarded as guarded

        return guarded(fn)(*args, **kwargs)

    return wrapper


def known_methods() -> list[str]:
    from ..train.options import METHODS

    return list(METHODS) + ([] if "full" in METHODS else ["full"])


def parse_methods(text: str | None) -> list[str]:
    known = known_methods()
    if text is None:
        return known
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise click.BadParameter("expected a comma-separated list of methods, found nothing", param_hint="--methods")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise click.BadParameter(f"unknown method(s) {', '.join(repr(n) for n in unknown)}; known: "
                                 f"{', '.join(known)}", param_hint="--methods")
    return _unique(names, "--methods")


def parse_ints(text: str, flag: str, minimum: int) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not p for p in parts):
        raise click.BadParameter(f"expected comma-separated integers, found {text!r}", param_hint=flag)
    values = []
    for p in parts:
        try:
            value = int(p)
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, found {p!r} in {text!r}",
                                     param_hint=flag) from None
        if value < minimum:
            raise click.BadParameter(f"expected integers >= {minimum}, found {value}", param_hint=flag)
        values.append(value)
    return _unique(values, flag)


def _unique(values: list, flag: str) -> list:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise click.BadParameter(f"{seen[0]!r} is given twice", param_hint=flag)
    return values


def parse_method_options(items: tuple[str, ...], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--option METHOD.KEY=VALUE`` (repeatable) -> {method: {field: value}}, each value read
    and checked as the trainer reads a YAML key."""
    import yaml

    from .. import ConfigError
    from ..train.options import _convert, _near_keys, key_to_field

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, eq, raw = item.partition("=")
        method, dot, key = head.partition(".")
        if not eq or not dot or not method.strip() or not key.strip():
            raise click.BadParameter(f"expected METHOD.KEY=VALUE (e.g. lora.r=16), found {item!r}", param_hint="--option")
        method, key = method.strip(), key.strip()
        if method not in methods:
            raise click.BadParameter(f"{item!r}: {method!r} is not one of the methods compared "
                                     f"({', '.join(methods)})", param_hint="--option")
        field = key_to_field(key)
        if field is None:
            raise ConfigError(f"--option {item}: unknown key {key!r}; {_near_keys(key)}")
        if field in ("method", "data", "eval_data", "out", "seed", "task", "nproc"):
            raise click.BadParameter(f"{item!r}: compare sets {key} for every run itself", param_hint="--option")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.setdefault(method, {})[field] = _convert("--option", f"{method}.{key}", field, value)
    return out


@click.command()
@click.option("--model", default="minilm", show_default=True, help="A local transformers model directory, or 'minilm'.")
@click.option("--data", help="Training data, as for `peftkit train --data`.  [default: the bundled demo set]")
@click.option("--eval-data", help="Evaluation data.  [default: a held-out 20% of --data (seed 0, the same for every run)]")
@click.option("--eval-limit", type=click.IntRange(min=1), help="Evaluate on at most N examples of the evaluation set "
              "(a seeded sample).  [default: all]")
@click.option("--methods", help=METHOD_HELP)
@click.option("--epochs", type=click.IntRange(min=1), help="Passes over the training data for every method.  "
              "[default: each method's own]")
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps for every method (overrides --epochs).")
@click.option("--train-limit", type=click.IntRange(min=1), help="Train on the first N examples of the shuffled "
              "training data (seeded).  [default: all]")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds; every method runs once per seed.")
@click.option("--train-sizes", help="Comma-separated training-set sizes (learning curves): every method runs at "
              "each.  [default: --train-limit, or all]")
@click.option("--reference", type=click.Path(dir_okay=False), help="The forgetting measure's reference set "
              "(see peftkit eval --forgetting).  [default: the bundled one]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Examples per step for every method.")
@click.option("--lr", type=float, help="Peak learning rate for every method.  [default: each method's own]")
@click.option("--max-length", type=click.IntRange(min=1), help="Tokens per example.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cuda when available, else cpu]")
@click.option("--task", type=click.Choice(["classify", "causal-lm", "image-classify"]),
              help="[default: from the data, as peftkit train infers it]")
@click.option("--option", "method_options", multiple=True, metavar="METHOD.KEY=VALUE",
              help="An option of one method's runs, e.g. lora.r=16 or prompt.virtual_tokens=10 (repeatable).")
@click.option("--resume", is_flag=True, help="Keep the runs already in OUT/compare.json and do only the others.")
@click.option("--out", required=True, help="Directory for compare.json, compare.md, compare.html and runs/.")
@click.option("--quiet", "-q", is_flag=True, help="Only the final line of each run.")
@click.option("--debug", is_flag=True, help="Show tracebacks and library logs.")
@_guarded
def compare(model: str, data: str | None, eval_data: str | None, eval_limit: int | None, methods: str | None,
            epochs: int | None, max_steps: int | None, train_limit: int | None, seeds: str, train_sizes: str | None,
            reference: str | None, batch_size: int | None, lr: float | None, max_length: int | None,
            device: str | None, task: str | None, method_options: tuple[str, ...], resume: bool, out: str,
            quiet: bool, debug: bool) -> None:
    """Train every method on the same model, data, budget and seeds and compare quality, cost,
    forgetting, overfitting and data needs: OUT/compare.json, compare.md and compare.html (one
    self-contained page). Each run is a peftkit run directory in OUT/runs/. See docs/compare.md."""
    from ..train.tasks import infer_task
    from .runner import Plan, run_all

    names = parse_methods(methods)
    seed_list = parse_ints(seeds, "--seeds", 0)
    sizes: list[int | None] = parse_ints(train_sizes, "--train-sizes", 1) if train_sizes else [train_limit]
    if train_sizes and train_limit is not None and max(sizes) > train_limit:
        raise click.BadParameter(f"{max(sizes)} is more than --train-limit {train_limit}", param_hint="--train-sizes")
    if lr is not None and not lr > 0:
        raise click.BadParameter(f"expected a positive number, found {lr}", param_hint="--lr")
    per_method = parse_method_options(method_options, names)
    for path, flag in ((data, "--data"), (eval_data, "--eval-data"), (reference, "--reference")):
        if path is not None and not os.path.exists(path):
            raise click.BadParameter(f"{path}: not found", param_hint=flag)
    absolute = (lambda p: os.path.abspath(p) if p else None)
    task = task or infer_task(data)
    settings = {"model": os.path.abspath(model) if os.path.isdir(model) else model, "data": absolute(data),
                "eval_data": absolute(eval_data), "eval_limit": eval_limit, "task": task, "epochs": epochs,
                "max_steps": max_steps, "train_limit": train_limit, "batch_size": batch_size, "lr": lr,
                "max_length": max_length, "options": {m: per_method[m] for m in sorted(per_method)},
                "reference": absolute(reference), "device": device, "methods": names, "seeds": seed_list,
                "train_sizes": sizes}
    flags = {"model": settings["model"], "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
             "max_length": max_length, "device": device}
    plan = Plan(out=Path(out).absolute(), methods=names, seeds=seed_list, sizes=sizes, settings=settings, flags=flags,
                method_options=per_method, resume=resume, quiet=quiet,
                echo=lambda line: click.echo(line, err=True))
    document = run_all(plan)
    failed = sum(1 for r in document["runs"] if r.get("error"))
    click.echo(f"compare: {len(document['runs'])} runs ({failed} failed): {Path(out) / 'compare.md'}, "
               f"{Path(out) / 'compare.html'}", err=True)
