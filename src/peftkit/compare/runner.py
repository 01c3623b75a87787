"""The runs of a comparison: which, in what order, each in a child process, and ``--resume``.

A run is one (method, seed, training size). Each gets ``DIR/runs/<method>-s<seed>-n<size>/``,
a normal peftkit run directory (``peftkit eval --adapter`` and ``info`` work on it), plus the
child's files: ``spec.json``, ``status.json`` (its progress), ``result.json``, ``compare.log``
(its console output). After every run ``compare.json``, ``compare.md`` and ``compare.html`` are
rewritten, each as a whole (``peftkit.atomic``), so a crash or Ctrl-C loses only the run in
progress; ``--resume`` skips the runs ``compare.json`` already holds without an error (failed
ones are tried again) and keeps the rows of runs this call does not ask for.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import ConfigError
from ..train.report import write_json
from . import data as compare_data
from . import report

RESULT_FILE = "compare.json"
# The settings a resumed comparison must share with the runs it keeps (else they are not comparable).
SHARED_SETTINGS = ("model", "data", "eval_data", "eval_limit", "task", "epochs", "max_steps", "train_limit",
                   "batch_size", "lr", "max_length", "options", "reference")
CURVE_POINTS = 200  # training-loss points kept per run in compare.json (evenly thinned)


@dataclass(frozen=True)
class RunKey:
    method: str
    seed: int
    train_size: int | None  # None: an image folder, all of it

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}-n{self.train_size if self.train_size is not None else 'all'}"


@dataclass
class Plan:
    """What ``peftkit compare`` was asked to do (``cli.py`` checks the values)."""

    out: Path
    methods: list[str]
    seeds: list[int]
    sizes: list[int | None]  # None: all the training data
    settings: dict[str, Any]  # SHARED_SETTINGS and the rest, as recorded in compare.json
    flags: dict[str, Any]  # TrainOptions values for every run (None: the method's default)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # --option METHOD.KEY=VALUE
    resume: bool = False
    quiet: bool = False  # only each run's final line (no live line, no other lines)
    echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    previous: list[dict[str, Any]] = field(default_factory=list)  # the rows kept from compare.json (--resume)

    def info(self, line: str) -> None:
        if not self.quiet:
            self.echo(line)


def metric_of(task: str) -> str:
    return "eval_loss" if task == "causal-lm" else "accuracy"


def load_previous(plan: Plan) -> list[dict[str, Any]]:
    """The rows of an earlier ``compare.json`` to keep (``--resume``), after checking that it was
    made with the same settings; without ``--resume`` none."""
    path = plan.out / RESULT_FILE
    if not plan.resume:
        return []
    if not path.is_file():
        plan.info(f"--resume: no {path} yet; starting afresh")
        return []
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        runs, settings = earlier["runs"], earlier.get("settings", {})
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume: {path} is not a compare.json ({exc}); remove it or choose another --out") from None
    differ = [k for k in SHARED_SETTINGS if k in settings and settings.get(k) != plan.settings.get(k)]
    if differ:
        what = "; ".join(f"{k}: {settings.get(k)!r} there, {plan.settings.get(k)!r} now" for k in differ)
        raise ConfigError(f"--resume: {path} was made with other settings ({what}); its runs would not be "
                          "comparable: give the same flags, or another --out")
    return [r for r in runs if isinstance(r, dict)]


def run_all(plan: Plan) -> dict[str, Any]:
    """Every run of the plan not already done; returns the final ``compare.json``."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    rows = load_previous(plan)
    plan.previous = list(rows)
    done = {(r.get("method"), r.get("seed"), r.get("train_size")) for r in rows if not r.get("error")}
    split = compare_data.prepare(out / "data", plan.settings.get("data"), plan.settings.get("eval_data"),
                                 plan.settings.get("eval_limit"))
    too_big = [n for n in plan.sizes if n is not None and split.train_count is not None and n > split.train_count]
    if too_big:
        held = " besides the held-out evaluation set" if "held-out" in split.eval_source else ""
        raise ConfigError(f"--train-limit/--train-sizes {max(too_big)}: {split.train_path} has only "
                          f"{split.train_count} training records{held}")
    if split.train is None and any(n is not None for n in plan.sizes):
        raise ConfigError(f"--train-limit/--train-sizes: {split.train_path} is an image folder, which compare does "
                          "not cut down; drop them")
    sizes = [n if n is not None else split.train_count for n in plan.sizes]
    keys = [RunKey(m, s, n) for n in dict.fromkeys(sizes) for m in plan.methods for s in plan.seeds]
    todo = [k for k in keys if (k.method, k.seed, k.train_size) not in done]
    if len(todo) < len(keys):
        plan.info(f"--resume: {len(keys) - len(todo)} of {len(keys)} runs already in {out / RESULT_FILE}; skipped")
    plan.info(f"compare: {len(todo)} run(s) of {', '.join(plan.methods)} on {split.train_path} "
              f"(evaluation: {split.eval_source}); results in {out}")
    document = _document(plan, rows, split)
    _write(plan, document)
    for i, key in enumerate(todo, 1):
        row = run_one(plan, split, key, f"[{i}/{len(todo)}]")
        rows = [r for r in rows if (r.get("method"), r.get("seed"), r.get("train_size")) !=
                (key.method, key.seed, key.train_size)] + [row]
        document = _document(plan, rows, split)
        _write(plan, document)
    return document


def _document(plan: Plan, rows: list[dict[str, Any]], split: compare_data.Split) -> dict[str, Any]:
    task = plan.settings["task"]
    metric = metric_of(task)
    # the order of the first call, methods added later after them (rows arrive in that order)
    order = {m: i for i, m in enumerate(dict.fromkeys([r.get("method") for r in plan.previous] + plan.methods))}
    rows = sorted(rows, key=lambda r: (r.get("train_size") or 0, order.get(r.get("method"), len(order)),
                                       str(r.get("method")), r.get("seed") or 0))
    return {"task": task, "metric": metric, "runs": rows, "summary": report.summarize(rows, metric),
            "settings": {**plan.settings, "seeds": sorted({r.get("seed") for r in rows} | set(plan.seeds)),
                         "methods": list(dict.fromkeys([r.get("method") for r in rows] + plan.methods)),
                         "eval_source": split.eval_source, "train_records": split.train_count,
                         "eval_records": split.eval_count}}


def _write(plan: Plan, document: dict[str, Any]) -> None:
    from . import html

    write_json(plan.out / RESULT_FILE, document)
    report.write_markdown(plan.out / "compare.md", document)
    html.write_page(plan.out / "compare.html", document)


def options_for(plan: Plan, key: RunKey, train_file: str, eval_file: str | None, run_dir: Path):
    """The ``TrainOptions`` of one run: the method's own defaults, under the flags given to
    compare, under ``--option`` values for this method (checked as ``peftkit train`` checks)."""
    from ..train.options import build_options

    given = {**{k: v for k, v in plan.flags.items() if v is not None}, **plan.method_options.get(key.method, {})}
    given.update(method=key.method, seed=key.seed, data=train_file, eval_data=eval_file, out=str(run_dir),
                 task=plan.settings["task"])
    return build_options({}, given)


def run_one(plan: Plan, split: compare_data.Split, key: RunKey, counter: str) -> dict[str, Any]:
    """One run in a child process; its row (with ``error`` set when it failed)."""
    run_dir = plan.out / "runs" / key.name  # the child's files sit beside the trainer's (which leaves them alone)
    started = time.monotonic()
    line = LiveLine(plan.info, plan.quiet, f"{counter} {key.method} seed {key.seed} n={key.train_size}")
    try:
        train_file, sample = compare_data.subset(split, plan.out / "data", key.seed, key.train_size)
        options = options_for(plan, key, train_file, split.eval_path, run_dir)
    except Exception as exc:  # noqa: BLE001 - one bad method is one row
        from .child import error_line

        return _finish(line, error_row(key, error_line(exc), run_dir, plan.settings["task"]), plan, started)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "status.json"):
        (run_dir / stale).unlink(missing_ok=True)
    spec = {"options": options.to_dict(), "result": str(run_dir / "result.json"),
            "status": str(run_dir / "status.json"), "train_sample": sample, "reference": plan.settings.get("reference")}
    write_json(run_dir / "spec.json", spec)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    with open(run_dir / "compare.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "peftkit.compare.child", str(run_dir / "spec.json")],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            while proc.poll() is None:
                line.show(_read_json(run_dir / "status.json"))
                time.sleep(0.5)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            line.clear()
            raise
    result = _read_json(run_dir / "result.json")
    if result is None:
        tail = _last_line(run_dir / "compare.log")
        message = f"the run's process ended with exit status {proc.returncode} and no result"
        return _finish(line, error_row(key, f"{message}: {tail}" if tail else message, run_dir, plan.settings["task"]), plan, started)
    if result.get("error"):
        return _finish(line, error_row(key, result["error"], run_dir, plan.settings["task"]), plan, started)
    return _finish(line, result_row(key, result, run_dir, plan.settings["task"]), plan, started)


def _finish(line: "LiveLine", row: dict[str, Any], plan: Plan, started: float) -> dict[str, Any]:
    line.clear()
    metric = metric_of(plan.settings["task"])
    took = time.monotonic() - started
    if row.get("error"):
        plan.echo(f"{line.label}: FAILED ({took:.0f} s): {row['error']}")
    else:
        train = row.get(f"train_{metric}")
        forgetting = row.get("forgetting")
        plan.echo(f"{line.label}: {metric} {report.fmt_metric(row.get(metric))}"
                  + (f" (train {report.fmt_metric(train)})" if train is not None else "")
                  + f", {report.fmt_count(row.get('trainable_params'))} params, "
                  f"{report.fmt_bytes(row.get('adapter_bytes'))}, {row.get('train_seconds', 0):.1f} s training"
                  + (f", forgetting {forgetting:.4f}" if isinstance(forgetting, (int, float)) else "")
                  + f" ({took:.0f} s in all)")
    return row


def metric_fields(task: str) -> tuple[str, ...]:
    """The quality fields of a run's row (``train_<metric>`` with each)."""
    names = ("eval_loss", "perplexity") if task == "causal-lm" else ("accuracy",)
    return names + tuple(f"train_{n}" for n in names)


def error_row(key: RunKey, message: str, run_dir: Path, task: str) -> dict[str, Any]:
    return {"method": key.method, "seed": key.seed, "train_size": key.train_size,
            **{name: None for name in metric_fields(task)}, "trainable_params": None, "adapter_bytes": None,
            "train_seconds": None, "peak_memory_bytes": None, "forgetting": None, "error": message,
            "run_dir": str(run_dir)}


def result_row(key: RunKey, result: dict[str, Any], run_dir: Path, task: str) -> dict[str, Any]:
    summary = result["summary"]
    evaluation = summary.get("eval") or {}
    train = result.get("train_eval") or {}
    row: dict[str, Any] = {"method": key.method, "seed": key.seed, "train_size": key.train_size}
    if task == "causal-lm":
        row.update(eval_loss=evaluation.get("loss"), perplexity=evaluation.get("perplexity"),
                   train_eval_loss=train.get("loss"), train_perplexity=train.get("perplexity"))
    else:
        row.update(accuracy=evaluation.get("accuracy"), train_accuracy=train.get("accuracy"))
    forgetting = result.get("forgetting")
    row.update(trainable_params=summary.get("trainable_params"), adapter_bytes=summary.get("adapter_bytes"),
               train_seconds=summary.get("train_seconds"), peak_memory_bytes=result.get("peak_memory_bytes"),
               forgetting=forgetting.get("forgetting") if isinstance(forgetting, dict) else None, error=None,
               run_dir=str(run_dir), steps=summary.get("steps"), train_examples=summary.get("train_examples"),
               device=summary.get("device"), memory_kind=result.get("memory_kind"),
               forgetting_detail=forgetting, notes=result.get("notes") or [])
    row.update(curves(run_dir / "metrics.jsonl"))
    return _finite(row)


def curves(path: Path) -> dict[str, list[list[float]]]:
    """``loss_curve`` ([step, training loss], at most CURVE_POINTS) and ``eval_curve``
    ([step, evaluation loss]) from a run's ``metrics.jsonl``."""
    train, evals = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for text in lines:
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if "loss" in record:
            train.append([record["step"], record["loss"]])
        elif isinstance(record.get("eval"), dict) and "loss" in record["eval"]:
            evals.append([record["step"], record["eval"]["loss"]])
    if len(train) > CURVE_POINTS:
        every = len(train) / CURVE_POINTS
        train = [train[int(i * every)] for i in range(CURVE_POINTS - 1)] + [train[-1]]
    return {"loss_curve": train, "eval_curve": evals}


def _finite(value: Any) -> Any:
    """NaN and infinities as null: compare.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")[:300]


class LiveLine:
    """The progress of the run in flight on stderr: rewritten in place on a terminal, else a
    line when the phase changes and at every tenth of the training steps."""

    def __init__(self, echo: Callable[[str], None], quiet: bool, label: str) -> None:
        self.echo, self.quiet, self.label = echo, quiet, label
        self.tty = _isatty(sys.stderr)
        self.started = time.time()
        self.last_text = ""
        self.last_tenth = -1
        self.last_phase = ""
        self.train_started: tuple[float, int] | None = None

    def show(self, status: dict[str, Any] | None) -> None:
        if self.quiet:
            return
        phase = (status or {}).get("phase", "starting")
        step, total = int((status or {}).get("step") or 0), int((status or {}).get("total") or 0)
        text = f"{self.label}: {phase}"
        if phase == "train" and total:
            now = time.time()
            if self.train_started is None:
                self.train_started = (now, step)
            t0, s0 = self.train_started
            rate = (step - s0) / (now - t0) if now > t0 and step > s0 else None
            eta = f", ETA {_duration((total - step) / rate)}" if rate else ""
            text += f" step {step}/{total} ({100 * step // total}%){eta}"
        if self.tty:
            if text != self.last_text:
                sys.stderr.write("\r\033[K" + text)
                sys.stderr.flush()
        else:
            tenth = 10 * step // total if phase == "train" and total else -1
            if phase != self.last_phase or tenth != self.last_tenth:
                self.echo(text)
            self.last_tenth, self.last_phase = tenth, phase
        self.last_text = text

    def clear(self) -> None:
        if self.tty and self.last_text:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        self.last_text = ""


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
