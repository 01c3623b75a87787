"""The benchmark suite (``benchmarks/suite.py``, ``make bench``) runs end to end on a two-layer
Llama: every figure it reports is there, the targets are judged from the rounds, a missed
target gets a profile, and the peak-memory child reports a positive growth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import suite  # noqa: E402
import suite_report  # noqa: E402


def test_ratio_is_taken_round_by_round():
    # the second side is twice as fast in every round, while the machine slows down 3x midway
    rounds = {"a": [10, 10, 30, 30, 30], "b": [5, 5, 15, 15, 15]}
    median, low, high = suite_report.ratio(rounds, "a", "b")
    assert (median, low, high) == (2.0, 2.0, 2.0)
    assert suite_report.ratio(rounds, "a", "missing") is None


def test_targets_verdicts():
    result = {"method": "lora", "model": "m",
              "train_rounds": {"peftkit": [95, 96, 97, 98, 130], "floor": [100] * 5, "hf_peft": [100] * 5},
              "infer_rounds": {"peftkit": [100, 104, 108, 112], "base": [100] * 4}}
    rows = {r["target"]: r for r in suite_report.targets(result)}
    assert rows["step / floor"]["verdict"] == "met"  # median 0.97 <= 1.05
    assert rows["step / HF PEFT"]["verdict"] == "missed"  # 0.97 > 0.90, lower quartile too
    assert rows["unmerged inference / base"]["verdict"] == "noise"  # median 1.06, lower quartile below 1.05
    assert "step / peftkit LoRA" not in rows  # DoRA's target


def test_suite_runs_end_to_end(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--models", "tiny", "--methods", "lora", "dora",
                           "prompt", "--rounds", "2", "--no-write", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    by_method = {r["method"]: r for r in data["results"]}
    assert set(by_method) == {"lora", "dora", "prompt"}
    for r in data["results"]:
        assert {"floor", "peftkit", "hf_peft"} <= set(r["train_ms"])
        assert all(len(v) == 2 for v in r["train_rounds"].values())
        assert r["peak_bytes"]["peftkit"] > 0 and r["file_bytes"]["peftkit"] > 0
    assert "peftkit_lora" in by_method["dora"]["train_rounds"]  # DoRA's target is against LoRA, in its block
    assert "peftkit_merged" in by_method["lora"]["infer_rounds"]
    assert "peftkit_merged" not in by_method["prompt"]["infer_rounds"]  # nothing to merge
    targets = {(t["method"], t["target"]) for t in data["targets"]}
    assert ("dora", "step / peftkit LoRA") in targets and ("lora", "step / floor") in targets
    missed = {(t["model"], t["method"]) for t in data["targets"] if t["section"] == "train" and t["verdict"] == "missed"}
    assert {(p["model"], p["method"]) for p in data["profiles"]} == missed
    for p in data["profiles"]:
        assert p["ops"]["aten::mm"]["peftkit_calls"] > 0
    assert "| model | method | target |" in proc.stdout


def test_markdown_block_is_replaced_in_place(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text(f"# head\n\n{suite_report.MARK_BEGIN}\nold\n{suite_report.MARK_END}\n\n## after\n")
    result = {"method": "ia3", "model": "m", "libraries": ["peftkit"], "train_ms": {"floor": 1.0, "peftkit": 1.0},
              "train_rounds": {"floor": [1.0], "peftkit": [1.0]}, "infer_ms": {}, "infer_rounds": {"base": [1.0]},
              "load_ms": {"peftkit": 1.0}, "file_bytes": {"peftkit": 10}}
    info = {"cpu": "x", "avx512_bf16": False, "threads": 2, "cores": 2, "omp_wait_policy": "default",
            "torch": "t", "transformers": "t", "peft": "p", "date": "d", "minutes": 1.0}
    suite_report.write_markdown(doc, [result], {}, info, "cmd", [], [])
    text = doc.read_text()
    assert "old" not in text and text.index("| m | ia3 |") < text.index("## after")
    assert text.count(suite_report.MARK_BEGIN) == 1
