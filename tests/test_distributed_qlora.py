"""QLoRA under FSDP: two processes on CPU (torchrun, gloo) with a 4-bit NF4 base.

- ``fsdp_qlora_worker.py`` (one torchrun of two processes): for every weight-side method over a
  4-bit base, the model sharded as ``--fsdp`` shards it gives exactly the unsharded model's
  outputs and gradients; the gathered codes and their quantization state are checked inside the
  forward; no layer is repacked for AVX512-BF16 (the layers are made to believe the CPU has it,
  so this holds on every CPU).
- ``peftkit train --method qlora --fsdp --nproc 2``, float32 (with ``--gradient-checkpointing``)
  and ``--bf16``: the adapter one process trains with the same global batch (2 x 4 = 1 x 8),
  complete (every tensor whole, the keys and shapes of the single-process file, loadable by
  ``peftkit eval``), and ``--resume`` from the step-2 checkpoint reaches the uninterrupted
  adapter and metrics.
- ``benchmarks/gpu_bench.py --tiny --device cpu``: the GPU benchmark's code runs end to end.

Tolerances against one process: the two runs compute the same per-example numbers; what
differs is where sums are split (each process sums its 4 examples' loss and gradients, then
gloo adds the two partial sums, where one process adds 8 at once) and each micro-batch's
padded length. In float32 that reorders roundings of ~1e-7 relative: after four AdamW steps
the adapters differed by 7e-7 at most (tensors up to 0.19), far below ``atol=2e-4,
rtol=1e-3`` (test_distributed's bound). Under ``--bf16`` autocast
every matmul rounds its output to bfloat16 (~4e-3 relative), so the gradients of the two
splits differ by ~1e-2 relative, and AdamW, whose first steps move each element by about
lr whatever its gradient's size, turns that into a sign change of the elements whose gradient
is near zero: single elements differ by up to ~1.5e-2 after four steps (measured; one process
accumulating 2 x 4 differs from one process with 8 by as much). So the bf16 check is on the
whole adapter's movement: ``|fsdp - single| / |single - init|`` (Frobenius, over every tensor)
was 0.07 here (0.07 for 2 x 4 accumulated in one process as well, a legitimate split), 0.5 for
a run on half the global batch; the bound is 0.2. ``--resume`` repeats the same computation in
the same processes: equal bit for bit in both precisions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftkit.cli import cli
from peftkit.registry import cli_methods

from test_causal_lm import WORDS, _tokenizer
from test_distributed import assert_same_adapter

pytest.importorskip("bitsandbytes")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WEIGHTS = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A 2-layer Llama (hidden 32, no dropout) with a word-level tokenizer, and 16 prompt/response
    rows of different lengths (each process predicts a different number of tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("fsdp-qlora")
    tokenizer = _tokenizer(True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model_dir = root / "llama"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": " ".join(WORDS[i % 7: i % 7 + 2]), "response": " ".join(WORDS[: 3 + (5 * i) % 11])}
            for i in range(16)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root, model_dir, data


def train(lm, name: str, *flags) -> Path:
    root, model, data = lm
    out = root / name
    args = ["train", "--model", model, "--data", data, "--eval-data", data, "--method", "qlora", "--r", 4,
            "--targets", "all-linear", "--max-steps", 4, "--lr", 1e-2, "--dropout", 0, "--out", out, "--quiet",
            *flags]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return out


def assert_resumes_exactly(run: Path) -> None:
    """Continued from its step-2 checkpoint (in the 2 processes its options name), the run writes
    the adapter and the metrics it wrote without the interruption, bit for bit."""
    final = load_file(run / WEIGHTS)
    metrics = (run / "metrics.jsonl").read_text()
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "adapter")
    result = CliRunner().invoke(cli, ["train", "--resume", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    again = load_file(run / WEIGHTS)
    assert sorted(again) == sorted(final)
    for key in final:
        assert torch.equal(final[key], again[key]), key
    assert (run / "metrics.jsonl").read_text() == metrics


def assert_complete(single: Path, run: Path) -> None:
    """Every tensor whole: the keys and shapes of the one-process file, in the checkpoint too;
    the base recorded as 4-bit."""
    one = load_file(single / WEIGHTS)
    for path in (run / WEIGHTS, run / "checkpoints" / "step-2" / WEIGHTS):
        tensors = load_file(path)
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in one.items()}, path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["options"]["fsdp"] and summary["method"] == "qlora"
    # the whole model's bytes, as one process counts them (not one shard's)
    assert summary["base_bytes"] == json.loads((single / "summary.json").read_text())["base_bytes"]
    assert summary["base_bytes"]["quantized_bytes"] > 0


def assert_loads(run: Path, rel: float) -> None:
    """``peftkit eval`` rebuilds the 4-bit base in one process, loads the adapter strictly (every
    key, every shape) and gives the run's final evaluation (made by two processes, on other
    batches: to ``rel``)."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 8
    result = CliRunner().invoke(cli, ["eval", "--adapter", str(run / "adapter"), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["tokens"] == summary["eval"]["tokens"] and metrics["n"] == summary["eval"]["n"]
    assert metrics["loss"] == pytest.approx(summary["eval"]["loss"], rel=rel)


def test_sharded_4bit_layers_compute_exactly_what_unsharded_ones_do(tmp_path):
    """Every weight-side method (``qlora`` standing for ``lora``), in one torchrun of two
    processes: fsdp_qlora_worker.py's checks, bit for bit."""
    methods = [name for name, (method, _) in cli_methods().items() if not method.input_method and name != "lora"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "fsdp_qlora_worker.py"), str(tmp_path), ",".join(methods)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(HERE)]))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["methods"] == methods and result["checked_layers"] > 0


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_qlora_fsdp_two_processes_match_one_and_resume_exactly(lm, precision):
    flags = ["--bf16"] if precision == "bf16" else []
    single = train(lm, f"single-{precision}", "--batch-size", 8, *flags)
    # float32 with gradient checkpointing too: the sharded blocks are gathered again for the
    # recomputation in the backward pass (the numbers are the same as without it)
    ckpt = ["--gradient-checkpointing"] if precision == "float32" else []
    run = train(lm, f"fsdp-{precision}", "--batch-size", 4, "--nproc", 2, "--fsdp", "--save-steps", 2, *flags, *ckpt)
    if precision == "bf16":
        init = load_file(train(lm, "init-bf16", "--batch-size", 8, "--lr", 1e-12, *flags) / WEIGHTS)
        one, two = load_file(single / WEIGHTS), load_file(run / WEIGHTS)
        assert sorted(one) == sorted(two) == sorted(init)
        moved = sum(float((one[k] - init[k]).norm()) ** 2 for k in one) ** 0.5
        apart = sum(float((one[k] - two[k]).norm()) ** 2 for k in one) ** 0.5
        assert moved > 0 and apart / moved < 0.2, (apart, moved)
        losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
                  for d in (single, run)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    else:
        assert_same_adapter(single, run)
    assert_complete(single, run)
    assert_loads(run, rel=1e-3 if precision == "bf16" else 1e-6)
    assert_resumes_exactly(run)


def benchmark(name: str):
    """A script of benchmarks/ imported as a module (registered, as dataclasses need)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_runs_tiny_on_the_cpu(tmp_path):
    """The GPU benchmark's Python half, shrunk (--tiny) and on the CPU, in this process: every
    section runs and writes its JSON (the QLoRA rows too: bitsandbytes is installed here); the
    shell half parses."""
    bench = benchmark("gpu_bench")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "gpu_bench_tiny.json").read_text())
    assert results["skipped"] == []
    assert [r["variant"] for r in results["training"]] == ["floor", "peftkit-lora", "hf-lora", "floor-4bit",
                                                           "peftkit-qlora", "hf-qlora"]
    assert set(results["decode"]["variants"]) == {"peftkit_base", "peftkit_mixed", "hf_base", "hf_mixed"}
    assert results["decode"]["max_abs_logit_diff_peftkit_vs_hf"] < 0.05  # bf16 logits of the same adapters
    assert [r["run"] for r in results["trainer"]] == ["lora-bf16", "lora-bf16-gc", "qlora-bf16"]
    assert all("failed" not in r for r in results["trainer"]) and "failed" not in results["compile"]
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


def test_fsdp_memory_table_adds_up():
    """benchmarks/fsdp_memory.py: Llama-2-70B's parameter count, the sharded parts divide by the
    processes, the replicated ones do not, and checkpointing only changes the activations."""
    mem = benchmark("fsdp_memory")
    shape = mem.Shape.from_config(mem.LLAMA2_70B)
    counts = mem.counts(shape, 16)
    assert abs(counts["base_params"] / 1e9 - 68.98) < 0.01 and abs(counts["lora_params"] / 1e6 - 207.1) < 0.1
    two, eight = (mem.per_process(shape, w, 4096) for w in (2, 8))
    for part in ("4-bit codes", "LoRA weights + grads + AdamW (fp32)"):
        assert two[part] == pytest.approx(4 * eight[part])
    assert two["quantization state (every process)"] == eight["quantization state (every process)"]
    ckpt = mem.per_process(shape, 8, 4096, checkpointing=True)
    assert ckpt["activations"] < eight["activations"] / 10
    assert {k: v for k, v in ckpt.items() if k not in ("activations", "total")} == \
        {k: v for k, v in eight.items() if k not in ("activations", "total")}
