"""``peftkit plan``'s predictions against measurement (CPU, float32).

For all-MiniLM-L6-v2 (sequence classification, batch 32 × 64) and the suite's ~56M Llama config
(causal LM, batch 8 × 256) × LoRA, QLoRA, prompt tuning, full fine-tuning × gradient checkpointing
off/on: the prediction (``peftkit.plan.predict``: ``peak_bytes − weights_bytes``) beside the
measurement (``peftkit.plan.measure.measure``: a fresh process per case, peak RSS minus the RSS
after the base, over the trainer's two steps), one case at a time. The measurement runs with glibc
returning freed tensors to the system (``MALLOC_MMAP_THRESHOLD_=65536``) and, with
``--default-malloc``, also with glibc's defaults (a column of its own).

Writes ``benchmarks/results/plan.json`` and the table between the plan markers in BENCHMARKS.md.

    .venv/bin/python benchmarks/plan_validate.py [--models minilm llama] [--methods lora qlora prompt full]
        [--default-malloc]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings  # noqa: E402

warnings.simplefilter("ignore")

from peftkit.plan import Case, human, predict  # noqa: E402
from peftkit.plan.measure import measure  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK_BEGIN, MARK_END = "<!-- plan:begin -->", "<!-- plan:end -->"
LLAMA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
         "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
         "max_position_embeddings": 1024}
SHAPES = {"minilm": (32, 64), "llama": (8, 256)}


def model_arg(name: str, tmp: str) -> str:
    if name == "minilm":
        return "minilm"
    path = os.path.join(tmp, "llama-56m.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(LLAMA, f)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["minilm", "llama"], choices=sorted(SHAPES))
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora", "prompt", "full"])
    ap.add_argument("--default-malloc", action="store_true", help="also measure with glibc's defaults")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--render", action="store_true", help="only rewrite the BENCHMARKS.md section from "
                    "benchmarks/results/plan.json")
    args = ap.parse_args()
    if args.render:
        result = json.loads((HERE / "results" / "plan.json").read_text(encoding="utf-8"))
        write_section(result, "measured_default_malloc_bytes" in result["rows"][0])
        return
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            batch, length = SHAPES[name]
            for method in args.methods:
                for gc in (False, True):
                    case = Case(model=model_arg(name, tmp), method=method, batch_size=batch, max_length=length,
                                gradient_checkpointing=gc)
                    plan = predict(case)
                    predicted = plan.peak_bytes - plan.weights_bytes
                    measured = measure(case)["measured_bytes"]
                    row = {"model": name, "method": method, "checkpointing": gc, "batch": batch, "length": length,
                           "predicted_bytes": predicted, "measured_bytes": measured,
                           "ratio": predicted / measured, "weights_bytes": plan.weights_bytes,
                           "activations_bytes": plan.activations_bytes, "trainable_params": plan.trainable_params}
                    if args.default_malloc:
                        row["measured_default_malloc_bytes"] = measure(case, returning_malloc=False)["measured_bytes"]
                    rows.append(row)
                    print(f"{name:7} {method:7} {'gc' if gc else '  '} predicted {human(predicted):>11} "
                          f"measured {human(measured):>11} ratio {row['ratio']:.3f}"
                          + (f" (default malloc {human(row['measured_default_malloc_bytes'])})"
                             if args.default_malloc else ""), flush=True)
    if args.no_write:
        return
    import platform

    import torch
    import transformers

    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"transformers {transformers.__version__}")
    result = {"date": started, "command": " ".join(["benchmarks/plan_validate.py"] + sys.argv[1:]),
              "machine": machine, "rows": rows}
    out = HERE / "results" / "plan.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_section(result, args.default_malloc)


def write_section(result: dict, default_malloc: bool) -> None:
    rows = result["rows"]
    worst = max(abs(r["ratio"] - 1) for r in rows)
    intro = ("`peftkit plan` predicts a run's peak memory from the model's config (fake tensors, no weights; "
             "`docs/plan.md`). Each prediction's `peak_bytes − weights_bytes` beside the measurement "
             "(`peftkit.plan.measure`): a fresh process per case, the base loaded (and quantized for QLoRA: its "
             "weights are the 4-bit base), then the RSS peak over the trainer's two steps (apply, AdamW, forward, "
             "backward, clipping, step) minus the RSS after the base, with glibc returning freed tensors to the "
             "system (`MALLOC_MMAP_THRESHOLD_=65536`)"
             + (", and in the last column with glibc's defaults" if default_malloc else "")
             + ". Float32, one thread, one case at a time; minilm is all-MiniLM-L6-v2 (sequence classification), "
             "llama the suite's ~56M Llama config (hidden 512, 8 layers, vocabulary 32000; causal LM).")
    lines = [MARK_BEGIN, "## `peftkit plan`: predicted against measured peak memory (CPU, float32)", "",
             *textwrap.wrap(intro, 100), "",
             "```", f".venv/bin/python {result['command']}", "```", "",
             f"Measured {result['date']} UTC" + (f" ({result['machine']})" if result.get("machine") else "")
             + f". Largest deviation: {worst:.1%}.", ""]
    head = "| model | batch × length | method | checkpointing | predicted | measured | predicted / measured |"
    sep = "|---|---|---|---|---|---|---|"
    if default_malloc:
        head += " measured, glibc defaults |"
        sep += "---|"
    lines += [head, sep]
    for r in rows:
        line = (f"| {r['model']} | {r['batch']} × {r['length']} | {r['method']} | {'on' if r['checkpointing'] else 'off'} "
                f"| {human(r['predicted_bytes'])} | {human(r['measured_bytes'])} | {r['ratio']:.3f} |")
        if default_malloc:
            line += f" {human(r['measured_default_malloc_bytes'])} |"
        lines.append(line)
    if default_malloc:
        factors = [r["measured_default_malloc_bytes"] / r["predicted_bytes"] for r in rows]
        note = ("With glibc's defaults the RSS peak is the live bytes plus what glibc's heap kept of freed "
                "activations (blocks under its self-raising mmap threshold stay in the heap): "
                f"{min(factors):.2f}–{max(factors):.2f} times the prediction here; that part depends on the order and sizes of the allocations, not on what the "
                "run holds, and `peftkit plan` does not predict it (docs/plan.md).")
        lines += ["", *textwrap.wrap(note, 100)]
    lines += ["", MARK_END]
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8")
    section = "\n".join(lines)
    if MARK_BEGIN in text and MARK_END in text:
        text = text[:text.index(MARK_BEGIN)] + section + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
