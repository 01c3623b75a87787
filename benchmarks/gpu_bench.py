"""The GPU half of the benchmark suite: peftkit beside HF PEFT on a ~1B Llama (bf16, CUDA).

``benchmarks/gpu_check.sh`` runs it (and installs bitsandbytes from the wheel in the tree
first); ``--tiny --device cpu`` runs every section on a tiny model on the CPU in seconds, so
the code is known to work before a GPU is lent (``tests/test_distributed_qlora.py``).

The model: a Llama built from a config (hidden 2048, 16 layers, intermediate 5632, 32 heads,
8 key/value heads, vocabulary 32000: 0.85B parameters; random weights, seed 0) in bfloat16.
Sections (each writes its part of ``OUT/gpu_bench.json``, ``gpu_bench_tiny.json`` with
``--tiny``; ``OUT`` is ``--out``, else ``$OUT``, else ``benchmarks/results/``):

- ``training``: a step (forward and backward under bf16 autocast, AdamW) on batch x sequence
  1024 tokens: the floor (the frozen model's forward plus a backward to the input
  embeddings: what any adapter pays), peftkit LoRA and HF PEFT LoRA (r 16, alpha 32, every
  linear layer), and the same over the base quantized to NF4 (``peftkit.quantize``; peftkit's
  and HF PEFT's ``prepare_for_kbit_training``: HF PEFT's upcasts every non-quantized parameter
  to float32, peftkit's only the norms) with its own floor. Tokens/s from the median step, and
  ``torch.cuda.max_memory_allocated`` over the timed steps.
- ``decode``: mixed-adapter generation, 8 adapters (r 16, every linear layer, saved by peftkit
  and loaded from the same files by HF PEFT), 32 rows (row i on adapter i mod 8,
  ``adapter_names=``), a 256-token prompt; greedy ``generate`` of 1 and of 65 tokens, so the
  decode rate is rows x 64 / (t65 - t1); beside the base (adapters disabled) of each library.
- ``compile``: the peftkit LoRA training step eager and with every decoder layer compiled
  (``torch.compile`` per layer: one graph reused by the 16 layers, the compile time stays
  short); the compile time is reported apart.
- ``trainer``: ``peftkit train --task causal-lm --bf16`` (packed rows of 1024 tokens,
  LoRA r 16 on every linear layer) for a few steps with and without
  ``--gradient-checkpointing``, and as ``--method qlora``: seconds per step, tokens/s and the
  peak memory from ``summary.json`` (the run in this process: the peak is reset before each;
  the model, data and run directories in a temporary directory, removed afterwards).

QLoRA rows need bitsandbytes; without it they are skipped with a message in the JSON.

    PYTHONPATH=src python benchmarks/gpu_bench.py --device cuda          # ~3-4 minutes on an H200
    PYTHONPATH=src python benchmarks/gpu_bench.py --tiny --device cpu    # the check of the script
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab
    "1b": (2048, 16, 5632, 32, 8, 32000),
    "tiny": (64, 2, 128, 4, 2, 512),
}
SECTIONS = ("training", "decode", "trainer", "compile")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16
        self.shape = SHAPES["tiny" if args.tiny else "1b"]
        self.skipped: list[str] = []
        try:
            importlib.import_module("bitsandbytes")
            self.bnb = True
        except ImportError as exc:
            self.bnb = False
            self.skipped.append(f"QLoRA rows: bitsandbytes is not importable ({exc}); gpu_check.sh installs it "
                                "from benchmarks/wheels/ or $BNB_WHEEL")

    # -- helpers ---------------------------------------------------------------------------

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 3) if self.cuda else None

    def model(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, layers, inter, heads, kv, vocab = self.shape
        cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                          num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                          max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        with torch.device(self.device):
            model = LlamaForCausalLM(cfg)
        return model.to(self.dtype)

    def ids(self, rows: int, length: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, self.shape[5], (rows, length), generator=g).to(self.device)

    def timed(self, step, warmup: int, steps: int) -> tuple[float, float | None]:
        """(median seconds of ``steps`` calls after ``warmup``, peak GiB over the timed calls)."""
        for _ in range(warmup):
            step()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), self.peak_gib()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- training ----------------------------------------------------------------------------

    def adapted(self, library: str, four_bit: bool):
        """The 1B model with LoRA r 16 on every linear layer (or frozen: ``library == "floor"``)."""
        import peftkit

        model = self.model()
        model.config.use_cache = False  # no KV cache in training (under compile, each layer's cache slot is a guard)
        if four_bit:
            peftkit.quantize(model, compute_dtype=self.dtype)
        model.requires_grad_(False)
        if library == "peftkit":
            if four_bit:
                peftkit.prepare_for_kbit_training(model, gradient_checkpointing=False)
            peftkit.apply(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        elif library == "hf":
            import peft

            if four_bit:
                model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                               task_type="CAUSAL_LM"))
        return model.train()

    def step_fn(self, model, ids: torch.Tensor):
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:  # the floor: backward to the input embeddings only
            embed = model.get_input_embeddings()

            def floor():
                x = embed(ids).detach().requires_grad_(True)
                with self.autocast():
                    loss = model(inputs_embeds=x, labels=ids).loss
                loss.backward()
            return floor, 0, None
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)

        def step():
            with self.autocast():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step, sum(p.numel() for p in trainable), str(trainable[0].dtype)

    def training(self) -> list[dict]:
        a = self.args
        ids = self.ids(a.batch, a.seq)
        variants = [("floor", False), ("peftkit", False), ("hf", False)]
        if self.bnb:
            variants += [("floor", True), ("peftkit", True), ("hf", True)]
        rows = []
        for library, four_bit in variants:
            name = f"{library}-{'qlora' if four_bit else 'lora'}" if library != "floor" else \
                ("floor-4bit" if four_bit else "floor")
            model = step = None
            try:  # one variant failing (a bitsandbytes without its CUDA library, ...) keeps the others
                model = self.adapted(library, four_bit)
                step, trainable, adapter_dtype = self.step_fn(model, ids)
                seconds, peak = self.timed(step, a.warmup, a.steps)
                rows.append({"variant": name, "step_ms": round(1000 * seconds, 2),
                             "tokens_per_s": round(a.batch * a.seq / seconds, 1), "peak_gib": peak,
                             "trainable": trainable, "adapter_dtype": adapter_dtype})
            except Exception as exc:
                rows.append({"variant": name, "failed": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
            del model, step
            self.free()
        return rows

    # -- decode ------------------------------------------------------------------------------

    def decode(self) -> dict:
        import peft

        import peftkit

        a = self.args
        base = self.model().eval()
        names = [f"a{i}" for i in range(a.adapters)]
        with tempfile.TemporaryDirectory() as tmp:
            ours = copy.deepcopy(base)
            for i, name in enumerate(names):
                torch.manual_seed(100 + i)
                peftkit.apply(ours, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                       init_lora_weights=False, task_type="CAUSAL_LM"), name=name)
                peftkit.save(ours, os.path.join(tmp, name), name=name)
            ours.eval()
            theirs = peft.PeftModel.from_pretrained(base, os.path.join(tmp, names[0]), adapter_name=names[0])
            for name in names[1:]:
                theirs.load_adapter(os.path.join(tmp, name), adapter_name=name)
            theirs.eval()
        rows = [names[i % len(names)] for i in range(a.rows)]
        ids = self.ids(a.rows, a.prompt, seed=1)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            diff = float((ours(input_ids=ids, adapter_names=rows).logits.float()
                          - theirs(input_ids=ids, adapter_names=rows).logits.float()).abs().max())

        def generate(model, new: int, context=None, **extra):
            def run():
                with torch.no_grad(), (context() if context else _nothing()):
                    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0, **extra)
            return run

        variants = {
            "peftkit_base": (ours, {"context": functools.partial(peftkit.disabled, ours)}),
            "peftkit_mixed": (ours, {"adapter_names": rows}),
            "hf_base": (theirs, {"context": theirs.disable_adapter}),
            "hf_mixed": (theirs, {"adapter_names": rows}),
        }
        result = {"rows": a.rows, "adapters": len(names), "prompt": a.prompt, "new_tokens": a.new_tokens,
                  "max_abs_logit_diff_peftkit_vs_hf": diff, "variants": {}}
        for name, (model, extra) in variants.items():
            short, _ = self.timed(generate(model, 1, **extra), 1, a.reps)
            long, peak = self.timed(generate(model, a.new_tokens + 1, **extra), 1, a.reps)
            result["variants"][name] = {"prefill_s": round(short, 4), "generate_s": round(long, 4),
                                        "decode_tokens_per_s": round(a.rows * a.new_tokens / max(long - short, 1e-9), 1),
                                        "peak_gib": peak}
            print(name, json.dumps(result["variants"][name]), flush=True)
        v = result["variants"]
        result["peftkit_mixed_over_hf_mixed_tokens_per_s"] = round(
            v["peftkit_mixed"]["decode_tokens_per_s"] / v["hf_mixed"]["decode_tokens_per_s"], 3)
        del ours, theirs, base
        self.free()
        return result

    # -- compile -----------------------------------------------------------------------------

    def compile(self) -> dict:
        a = self.args
        ids = self.ids(a.batch, a.seq)
        eager = self.adapted("peftkit", False)
        compiled = self.adapted("peftkit", False)
        import torch._dynamo

        # one graph for the first layer (its input needs no grad) and one for the others
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 + len(compiled.model.layers))
        for layer in compiled.model.layers:
            layer.compile(backend=a.compile_backend)
        step_e, _, _ = self.step_fn(eager, ids)
        step_c, _, _ = self.step_fn(compiled, ids)
        t0 = time.perf_counter()
        step_c()
        step_c()
        self.sync()
        compile_s = time.perf_counter() - t0
        times = {"eager": [], "compiled": []}
        for _ in range(a.warmup):
            step_e()
        for _ in range(a.steps):  # alternating, so drift hits both alike
            for name, fn in (("eager", step_e), ("compiled", step_c)):
                self.sync()
                t = time.perf_counter()
                fn()
                self.sync()
                times[name].append(time.perf_counter() - t)
        ms = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
        from torch._dynamo.utils import counters

        result = {"what": "peftkit LoRA step, every decoder layer compiled", "backend": a.compile_backend,
                  "graphs": counters["stats"]["unique_graphs"],
                  "graph_breaks": sum(counters["graph_break"].values()),
                  "compile_and_first_steps_s": round(compile_s, 2), "step_ms": ms,
                  "tokens_per_s": {k: round(a.batch * a.seq / (v / 1000), 1) for k, v in ms.items()},
                  "compiled_over_eager": round(ms["compiled"] / ms["eager"], 3)}
        print(json.dumps(result), flush=True)
        del eager, compiled, step_e, step_c
        self.free()
        return result

    # -- trainer -----------------------------------------------------------------------------

    def trainer(self) -> list[dict]:
        with tempfile.TemporaryDirectory(prefix="peftkit-gpu-bench-") as tmp:  # the model is GiBs: not in OUT
            return self._trainer(Path(tmp))

    def _trainer(self, work: Path) -> list[dict]:
        from peftkit.cli import cli

        a = self.args
        model_dir, data, eval_data = self._trainer_files(work)
        runs = [("lora-bf16", []), ("lora-bf16-gc", ["--gradient-checkpointing"])]
        if self.bnb:
            runs.append(("qlora-bf16", ["--method", "qlora"]))
        rows = []
        for name, extra in runs:
            self.free()
            args = ["train", "--task", "causal-lm", "--model", str(model_dir), "--data", str(data), "--eval-data",
                    str(eval_data), "--max-length", str(a.seq), "--packing", "--batch-size", str(a.trainer_batch),
                    "--max-steps", str(a.trainer_steps), "--bf16", "--r", "16", "--targets", "all-linear",
                    "--device", self.device.type, "--out", str(work / name), "--quiet", *extra]
            try:
                cli.main(args, standalone_mode=False)
            except SystemExit as exc:  # an error was printed as one line
                if exc.code:
                    rows.append({"run": name, "failed": f"exit status {exc.code}"})
                    continue
            except Exception as exc:  # the other runs still run
                rows.append({"run": name, "failed": f"{type(exc).__name__}: {exc}"})
                continue
            s = json.loads((work / name / "summary.json").read_text())
            per_step = s["train_seconds"] / max(1, s["steps"])
            rows.append({"run": name, "flags": extra, "steps": s["steps"], "s_per_step": round(per_step, 4),
                         "packed_tokens_per_s": round(a.trainer_batch * a.seq / per_step, 1),
                         "peak_gib": round(s["peak_gpu_bytes"] / 2**30, 3) if s["peak_gpu_bytes"] else None,
                         "base_gib": round(sum(s["base_bytes"].values()) / 2**30, 3), "eval_loss": s["eval"]["loss"]})
            print(json.dumps(rows[-1]), flush=True)
        self.free()
        return rows

    def _trainer_files(self, work: Path) -> tuple[Path, Path, Path]:
        """The 1B model saved with a word-level tokenizer, 256 training rows and 16 evaluation ones."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        work.mkdir(parents=True, exist_ok=True)
        vocab = self.shape[5]
        words = [f"w{i}" for i in range(vocab - 4)]
        tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)},
                                        unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")
        model_dir = work / "llama"
        model = self.model()
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        self.free()
        g = torch.Generator().manual_seed(0)
        length = self.args.seq

        def write(path: Path, n: int) -> Path:
            with open(path, "w", encoding="utf-8") as f:
                for _ in range(n):
                    k = int(torch.randint(length // 8, length // 2, (1,), generator=g))
                    ids = torch.randint(0, len(words), (k,), generator=g).tolist()
                    f.write(json.dumps({"prompt": " ".join(words[i] for i in ids[: k // 4]),
                                        "response": " ".join(words[i] for i in ids[k // 4:])}) + "\n")
            return path
        return model_dir, write(work / "train.jsonl", 256), write(work / "eval.jsonl", 16)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def environment(device: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    for name in ("peft", "bitsandbytes"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny model and few steps: the check of the script")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--out", help="results directory (default: $OUT, else benchmarks/results/)")
    ap.add_argument("--budget", type=float, default=270, help="seconds; sections not started by then are skipped")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; eager with --tiny)")
    args = ap.parse_args(argv)
    tiny = args.tiny
    defaults = dict(batch=2 if tiny else 8, seq=32 if tiny else 1024, warmup=1 if tiny else 2, steps=2 if tiny else 8,
                    adapters=2 if tiny else 8, rows=4 if tiny else 32, prompt=8 if tiny else 256,
                    new_tokens=3 if tiny else 64, reps=1 if tiny else 3, trainer_batch=2 if tiny else 4,
                    trainer_steps=2 if tiny else 10)
    for k, v in defaults.items():
        setattr(args, k, v)
    args.compile_backend = args.compile_backend or ("eager" if tiny else "inductor")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: --device cuda, but CUDA is not available (use --tiny --device cpu to check the script)")
        return 2
    out = Path(args.out or os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    bench = Bench(args)
    started = time.perf_counter()
    results: dict = {"environment": environment(bench.device), "tiny": args.tiny,
                     "shape": dict(zip(("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab"), bench.shape)),
                     "batch": args.batch, "seq": args.seq, "seconds": {}}
    path = out / ("gpu_bench_tiny.json" if args.tiny else "gpu_bench.json")
    for section in [s for s in args.sections.split(",") if s]:
        if section not in SECTIONS:
            print(f"gpu_bench: unknown section {section!r}; known: {', '.join(SECTIONS)}")
            return 2
        if time.perf_counter() - started > args.budget:
            bench.skipped.append(f"{section}: not started, the {args.budget:.0f} s budget was spent")
            continue
        t0 = time.perf_counter()
        print(f"== {section}", flush=True)
        try:
            results[section] = getattr(bench, section)()
        except Exception as exc:  # one section failing must not lose the others' results
            results[section] = {"failed": f"{type(exc).__name__}: {exc}"}
            print(f"{section} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        results["seconds"][section] = round(time.perf_counter() - t0, 1)
        results["skipped"] = bench.skipped
        path.write_text(json.dumps(results, indent=1))  # after every section: a timeout keeps what was done
    results["skipped"] = bench.skipped
    results["seconds"]["total"] = round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path} ({results['seconds']['total']} s)")
    failed = [s for s in SECTIONS if isinstance(results.get(s), dict) and "failed" in results[s]]
    failed += [f"{s}: {r.get('variant') or r.get('run')}" for s in ("training", "trainer")
               if isinstance(results.get(s), list) for r in results[s] if "failed" in r]
    if failed:
        print(f"gpu_bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
