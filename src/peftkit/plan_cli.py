"""``peftkit plan``: will a training run fit? The prediction of ``peftkit.plan`` as a table or JSON.

Its own module (registered at the end of ``cli.py``) so that ``peftkit.cli`` does not import it, and
it imports ``cli`` only for the shared decorators.
"""

from __future__ import annotations

import json
from typing import Any

import click

from .cli import _common, _guarded
from .train.options import METHODS, QUANT_TYPES

SHOWN = 20  # --budget: fitting configurations listed in the table (best first)


@click.command("plan")
@click.option("--model", default="minilm", show_default=True,
              help="The base model: 'minilm', a model directory or a config.json file (only the config is read).")
@click.option("--method", default="lora", show_default=True, type=click.Choice(METHODS),
              help="A trainer method, or full (every parameter trains).")
@click.option("--r", type=int, help="Rank of the rank methods.  [default: the method's, as in peftkit train]")
@click.option("--virtual-tokens", type=int, help="prompt, ptuning, prefix: virtual tokens.  [default: the trainer's]")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Examples a step.")
@click.option("--max-length", type=int, default=64, show_default=True,
              help="Tokens an example (every example counted at this length).")
@click.option("--quantize", type=click.Choice(QUANT_TYPES), help="A 4-bit base.  [default: nf4 with --method qlora]")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False)
@click.option("--bf16/--no-bf16", default=False, help="bfloat16 autocast (predicted, not validated).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--task", type=click.Choice(["classify", "causal-lm"]),
              help="[default: causal-lm for a decoder, else classify]")
@click.option("--num-labels", type=int, default=2, show_default=True, help="classify: labels of the head.")
@click.option("--budget", help="Memory available, e.g. 24GB, 24GiB, 800MB or bytes: list what fits and recommend one.")
@click.option("--search", "search_methods", help="--budget: the methods to try, a comma list.  "
              "[default: lora,qlora,prompt,full: the validated ones]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_common
@_guarded
def plan(model: str, method: str, r: int | None, virtual_tokens: int | None, batch_size: int, max_length: int,
         quantize: str | None, gradient_checkpointing: bool, bf16: bool, device: str, task: str | None,
         num_labels: int, budget: str | None, search_methods: str | None, as_json: bool, quiet: bool,
         debug: bool) -> None:
    """Predict the peak memory of `peftkit train` from the model's config alone (no weights loaded):
    weights, adapter weights, gradients, optimizer state and activations at the peak, trainable
    parameters and the adapter file's size.  With --budget, what fits and a recommendation."""
    from .errors import ConfigError
    from .plan import HEADROOM, RULE, VALIDATED_CPU, Case, human, parse_bytes, predict, search

    limit = parse_bytes(budget) if budget is not None else None
    methods = VALIDATED_CPU
    if search_methods is not None:
        methods = tuple(m.strip() for m in search_methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(f"--search {search_methods!r}: expected a comma list of {', '.join(METHODS)}")
    case = Case(model=model, method=method, r=r, virtual_tokens=virtual_tokens, batch_size=batch_size,
                max_length=max_length, quantize=quantize, gradient_checkpointing=gradient_checkpointing, bf16=bf16,
                device=device, task=task, num_labels=num_labels)
    fitting: list[Any] = []
    pick = None
    if limit is None:
        result = predict(case)
    else:
        result, candidates, pick = search(case, limit, methods)
    out: dict[str, Any] = result.to_dict()
    if limit is not None:
        out["budget_bytes"] = limit
        out["fits"] = result.peak_bytes <= limit * (1 - HEADROOM)
        fitting = [c for c in candidates if c.fits]
        out["rule"] = RULE
        out["fitting"] = [vars(c) for c in fitting]
        out["recommendation"] = vars(pick) if pick is not None else None
    if as_json:
        click.echo(json.dumps(out))
        return
    c = case
    shape = f"batch {c.batch_size} x {c.max_length}"
    flags = ", ".join(x for x in (result.task, shape, "bf16 autocast" if c.bf16 else "float32",
                                  "gradient checkpointing" if c.gradient_checkpointing else "") if x)
    click.echo(f"plan: --method {c.method} on {c.model} ({result.model_type}; {flags}) on {c.device}")
    rows = [("weights", result.weights_bytes), ("adapter weights", result.adapter_bytes),
            ("gradients", result.gradients_bytes), ("optimizer state", result.optimizer_bytes),
            ("activations", result.activations_bytes), ("peak", result.peak_bytes)]
    for label, n in rows:
        click.echo(f"  {label:<16} {human(n):>12}")
    share = 100 * result.trainable_params / max(result.total_params, 1)
    click.echo(f"trainable params: {result.trainable_params:,} of {result.total_params:,} ({share:.2f}%)")
    what = "model file (model.safetensors)" if c.method == "full" else "adapter file"
    click.echo(f"{what}: {human(result.adapter_file_bytes)}")
    click.echo("measured on the CPU: peak - weights (docs/plan.md); "
               + ("validated within 20% (BENCHMARKS.md)" if result.validated else "NOT validated"))
    for note in result.notes:
        click.echo(f"note: {note}")
    if limit is None:
        return
    verdict = "fits" if out["fits"] else "does not fit"
    click.echo(f"\nbudget {human(limit)}: this configuration {verdict} (with {HEADROOM:.0%} headroom)")
    if fitting:
        click.echo(f"fitting configurations ({len(fitting)}; peaks interpolated between simulated corners):")
        click.echo(f"  {'method':<8} {'r':>4} {'batch':>6} {'checkpointing':>14} {'peak':>12} {'trainable':>14}")
        for f in fitting[:SHOWN]:
            click.echo(f"  {f.method:<8} {f.r if f.r is not None else '-':>4} {f.batch_size:>6} "
                       f"{'on' if f.gradient_checkpointing else 'off':>14} {human(f.peak_bytes):>12} "
                       f"{f.trainable_params:>14,}")
        if len(fitting) > SHOWN:
            click.echo(f"  ... and {len(fitting) - SHOWN} more (--json lists them all)")
    click.echo(f"rule: {RULE}")
    if pick is None:
        click.echo("recommendation: none fits; a larger budget, a shorter --max-length or a smaller model")
    else:
        rank = f" --r {pick.r}" if pick.r is not None else ""
        click.echo(f"recommendation: --method {pick.method}{rank} --batch-size {pick.batch_size}"
                   + (" --gradient-checkpointing" if pick.gradient_checkpointing else "")
                   + f" (peak {human(pick.peak_bytes)})")
