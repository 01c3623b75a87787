"""`peftkit compare`: real runs on a tiny BERT (each in its own process, through the trainer),
compare.json's schema and summary, a failing method as an error row, --resume, the Markdown
table's best marks, the page's figures, the peak-memory measure and the command's errors."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest

from cli_helpers import assert_clean_error, invoke, save_tiny_bert, write_topic_files
from peftkit.compare import child, html, report

RUN_KEYS = {"method", "seed", "train_size", "accuracy", "train_accuracy", "trainable_params", "adapter_bytes",
            "train_seconds", "peak_memory_bytes", "forgetting", "error"}
METHODS = ("lora", "prompt")  # prompt fails: --option prompt.r=4 (r is not an option of prompt)
# (method, seed, size) of every row: lora and prompt at 2 seeds x 2 sizes, then full fine-tuning
# once, added to the same comparison by a second call with --resume (full runs are the slow ones)
KEYS = {(m, s, n) for m in METHODS for s in (0, 1) for n in (9, 18)} | {("full", 0, 18)}


def compare_args(tmp: Path, *extra: str, methods: str = ",".join(METHODS), seeds: str = "0,1",
                 sizes: str = "9,18") -> list[str]:
    return ["compare", "--model", tmp / "bert", "--data", tmp / "train.csv", "--eval-data", tmp / "eval.jsonl",
            "--methods", methods, "--option", "prompt.r=4", "--max-steps", "2", "--seeds", seeds,
            "--train-sizes", sizes, "--out", tmp / "out", *extra]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    save_tiny_bert(tmp / "bert")
    write_topic_files(tmp)
    result = invoke(*compare_args(tmp))
    assert result.exit_code == 0, result.output
    full = invoke(*compare_args(tmp, "--resume", methods="full,prompt", seeds="0", sizes="18"))
    assert full.exit_code == 0, full.output
    assert "already in" not in full.stderr and "[1/2] full seed 0 n=18: accuracy" in full.stderr, full.stderr
    return tmp, result


def _document(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "compare.json").read_text(encoding="utf-8"))


def test_every_run_through_the_trainer(compared):
    tmp, result = compared
    doc = _document(tmp)
    assert doc["task"] == "classify" and doc["metric"] == "accuracy"
    runs = doc["runs"]
    assert len(runs) == len(KEYS) and {(r["method"], r["seed"], r["train_size"]) for r in runs} == KEYS
    for run in runs:
        assert RUN_KEYS <= set(run), sorted(RUN_KEYS - set(run))
        run_dir = tmp / "out" / "runs" / f"{run['method']}-s{run['seed']}-n{run['train_size']}"
        if run["method"] == "prompt":
            assert run["error"].startswith("--r does not apply to --method prompt"), run["error"]
            assert run["accuracy"] is None and run["train_accuracy"] is None and run["trainable_params"] is None
            continue
        assert run["error"] is None
        assert 0 <= run["accuracy"] <= 1 and 0 <= run["train_accuracy"] <= 1
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["method"] == run["method"] and summary["seed"] == run["seed"]
        assert summary["train_examples"] == run["train_size"] and summary["steps"] == 2
        assert run["accuracy"] == summary["eval"]["accuracy"]
        assert run["trainable_params"] == summary["trainable_params"] > 0
        weights = run_dir / ("model/model.safetensors" if run["method"] == "full" else "adapter/adapter_model.safetensors")
        assert run["adapter_bytes"] == weights.stat().st_size
        assert run["train_seconds"] > 0 and isinstance(run["peak_memory_bytes"], int) and run["peak_memory_bytes"] > 0
        assert isinstance(run["forgetting"], float) and run["forgetting_detail"]["kind"] == "encoder"
        assert run["loss_curve"] and [p[0] for p in run["loss_curve"]] == [1, 2]
    by = {(r["method"], r["seed"], r["train_size"]): r for r in runs}
    assert by[("full", 0, 18)]["trainable_params"] > 50 * by[("lora", 0, 18)]["trainable_params"]
    assert by[("full", 0, 18)]["adapter_bytes"] > by[("lora", 0, 18)]["adapter_bytes"]
    assert by[("full", 0, 18)]["peak_memory_bytes"] > by[("lora", 0, 18)]["peak_memory_bytes"]
    # one final line per run of the first call on stderr, the failed ones marked
    finals = [line for line in result.stderr.splitlines() if ": accuracy " in line or ": FAILED" in line]
    assert len(finals) == 8, result.stderr
    assert sum(": FAILED" in line for line in finals) == 4


def test_summary_is_the_runs_mean_and_sd(compared):
    tmp, _ = compared
    doc = _document(tmp)
    assert len(doc["summary"]) == len(METHODS) * 2 + 1
    for row in doc["summary"]:
        assert set(row) == {"method", "train_size", "mean", "sd", "n"}
        values = [r["accuracy"] for r in doc["runs"] if r["method"] == row["method"]
                  and r["train_size"] == row["train_size"] and not r["error"]]
        assert row["n"] == len(values)
        if row["method"] == "prompt":
            assert values == [] and row["mean"] is None and row["sd"] is None
        elif row["method"] == "full":
            assert row["n"] == 1 and row["mean"] == values[0] and row["sd"] is None
        else:
            assert len(values) == 2
            assert row["mean"] == pytest.approx(statistics.fmean(values))
            assert row["sd"] == pytest.approx(statistics.stdev(values))


def test_nested_seeded_subsets_and_one_eval_set(compared):
    tmp, _ = compared
    data = tmp / "out" / "data"

    def rows(name):
        with open(data / name, newline="", encoding="utf-8") as f:
            return list(csv.reader(f))[1:]

    small, large = rows("train-s0-n9.csv"), rows("train-s0-n18.csv")
    assert len(small) == 9 and len(large) == 18 and large[:9] == small
    assert rows("train-s1-n9.csv") != small  # another seed, another draw
    assert sorted(map(tuple, large)) == sorted(map(tuple, rows("train-s1-n18.csv")))  # all 18 rows either way
    options = json.loads((tmp / "out" / "runs" / "lora-s1-n9" / "options.json").read_text())
    assert options["data"].endswith("train-s1-n9.csv") and options["seed"] == 1
    assert options["eval_data"] == str(data / "eval.jsonl")  # every run: the same evaluation file
    assert len(rows("sample-s0-n9.csv")) == 6  # the train side: as many as the eval set (6), from the run's data
    assert rows("sample-s0-n9.csv") == small[:6]


def test_report_files(compared):
    tmp, _ = compared
    md = (tmp / "out" / "compare.md").read_text(encoding="utf-8")
    assert "## 18 training examples" in md and "## 9 training examples" in md and "## Learning curve" in md
    prompt_rows = [line for line in md.splitlines() if line.startswith("| prompt |")]
    assert len(prompt_rows) == 2 and all("0/2" in line and "does not apply" in line for line in prompt_rows)
    page = (tmp / "out" / "compare.html").read_text(encoding="utf-8")
    for fig_id in html.FIGURES:
        assert f'<svg id="{fig_id}"' in page
    assert "learning curves need at least two" not in page  # two sizes: the curves are drawn
    assert page.count("<polyline") >= 1 + 2  # lora's learning curve, the loss curves of lora and full


def document(rows: list[tuple[str, float, float, int, int, float, float]], metric: str = "accuracy") -> dict:
    """(method, metric, train metric, params, bytes, seconds, forgetting) x 2 seeds (metric ± 0.01)."""
    runs = []
    for method, value, train, params, size, seconds, forgetting in rows:
        for seed, shift in ((0, -0.01), (1, 0.01)):
            runs.append({"method": method, "seed": seed, "train_size": 100, metric: value + shift,
                         f"train_{metric}": train, "trainable_params": params, "adapter_bytes": size,
                         "train_seconds": seconds, "peak_memory_bytes": params * 10, "forgetting": forgetting,
                         "error": None, **({"perplexity": 2.0 + value} if metric == "eval_loss" else {})})
    runs.append({"method": "vera", "seed": 0, "train_size": 100, "error": "boom | bad", "trainable_params": None,
                 "adapter_bytes": None, "train_seconds": None, "peak_memory_bytes": None, "forgetting": None})
    return {"task": "classify" if metric == "accuracy" else "causal-lm", "metric": metric, "runs": runs,
            "summary": report.summarize(runs, metric)}


def _cells(md: str, method: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_markdown_marks_the_best_of_each_column():
    doc = document([("lora", 0.80, 0.85, 2000, 9000, 10.0, 0.01),    # gap +0.05
                    ("ia3", 0.70, 0.69, 400, 3000, 20.0, 0.002),     # gap -0.01: closest to 0
                    ("full", 0.90, 0.99, 900000, 4000000, 5.0, 0.2)])  # gap +0.09
    md = report.markdown(doc)
    header = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| method")).strip("|").split(" | ")]
    col = {name: i for i, name in enumerate(header)}
    lora, ia3, full, vera = (_cells(md, m) for m in ("lora", "ia3", "full", "vera"))
    assert full[col["accuracy"]] == "**0.9000 ± 0.0141**" and not lora[col["accuracy"]].startswith("**")
    assert ia3[col["train−eval gap"]] == "**-0.0100**" and lora[col["train−eval gap"]] == "+0.0500"
    assert ia3[col["trainable params"]].startswith("**") and ia3[col["adapter size"]].startswith("**")
    assert full[col["train time"]] == "**5.0 s**" and ia3[col["forgetting"]] == "**0.0020**"
    assert not any(c.startswith("**") for c in (lora[col["train accuracy"]], full[col["train accuracy"]]))
    assert vera[col["runs"]] == "0/1" and vera[col["accuracy"]] == "—" and "boom \\| bad" in vera[col["error"]]
    # a loss: the lowest is best
    doc = document([("lora", 1.5, 1.2, 2000, 9000, 10.0, 0.01), ("full", 1.2, 0.5, 900000, 4000000, 5.0, 0.2)],
                   metric="eval_loss")
    md = report.markdown(doc)
    assert _cells(md, "full")[2].startswith("**1.2000") and not _cells(md, "lora")[2].startswith("**")
    assert "perplexity" in md


def test_page_has_every_figure_without_any_network():
    doc = document([("lora", 0.8, 0.85, 2000, 9000, 10.0, 0.01), ("full", 0.9, 0.99, 900000, 4000000, 5.0, 0.2)])
    page = html.page(doc)
    for fig_id in html.FIGURES:
        assert page.count(f'<svg id="{fig_id}"') == 1
    assert "learning curves need at least two --train-sizes" in page  # one size: a note instead of curves
    assert "(log scale)" in page and "training time" in page  # the log axis, the marker-size legend
    assert "<script" not in page and "src=" not in page and "url(" not in page
    assert "boom | bad" in page


def test_causal_lm_rows(tmp_path):
    from peftkit.compare.runner import RunKey, error_row, result_row

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "lr": 0.1}\n{"step": 1, "eval": {"loss": 2.5}}\n')
    result = {"summary": {"eval": {"loss": 2.0, "perplexity": 7.39, "tokens": 50, "n": 5}, "trainable_params": 10,
                          "adapter_bytes": 100, "train_seconds": 1.5, "steps": 1},
              "train_eval": {"loss": 1.0, "perplexity": 2.72}, "forgetting": {"forgetting": 0.25, "kind": "causal-lm"},
              "peak_memory_bytes": 1000, "notes": []}
    row = result_row(RunKey("lora", 0, 5), result, tmp_path, "causal-lm")
    assert (row["eval_loss"], row["perplexity"], row["train_eval_loss"], row["train_perplexity"]) == (2.0, 7.39, 1.0, 2.72)
    assert row["forgetting"] == 0.25 and row["loss_curve"] == [[1, 3.0]] and row["eval_curve"] == [[1, 2.5]]
    failed = error_row(RunKey("full", 0, 5), "boom", tmp_path, "causal-lm")
    assert failed["eval_loss"] is None and failed["train_perplexity"] is None and failed["error"] == "boom"
    doc = {"task": "causal-lm", "metric": "eval_loss", "runs": [row, failed], "summary": report.summarize([row, failed], "eval_loss")}
    assert "| lora | 1/1 | 2.0000 | 1.0000 | +1.0000 | 7.3900 |" in report.markdown(doc)  # gap: eval minus train loss


def test_peak_memory_of_the_training_phase():
    memory = child.Memory()
    memory.begin()
    block = bytearray(64 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
    memory.end()
    del block
    assert memory.peak is not None and memory.peak >= 60 * 2**20
    assert memory.peak < 1024 * 2**20


def test_a_failure_inside_the_run_is_one_line(tmp_path, compared):
    tmp, _ = compared
    spec = {"options": {"model": str(tmp / "bert"), "data": str(tmp / "train.csv"), "eval_data": str(tmp / "eval.jsonl"),
                        "method": "lora", "targets": "no_such_module", "max_steps": 1, "out": str(tmp_path / "run")},
            "status": str(tmp_path / "status.json"), "result": str(tmp_path / "result.json"), "train_sample": None}
    result = child.run(spec)
    assert result["summary"] is None and "no_such_module" in result["error"] and "\n" not in result["error"]
    assert json.loads((tmp_path / "status.json").read_text())["phase"] == "loading"


@pytest.mark.parametrize("args, fragment", [
    (["--methods", "lora,nope"], "unknown method(s) 'nope'"),
    (["--methods", ","], "found nothing"),
    (["--seeds", "0,x"], "found 'x'"),
    (["--seeds", "1,1"], "given twice"),
    (["--train-sizes", "0,10"], "expected integers >= 1, found 0"),
    (["--train-sizes", "ten"], "found 'ten'"),
    (["--option", "lora-r=4"], "expected METHOD.KEY=VALUE"),
    (["--option", "dora.r=4"], "not one of the methods compared"),
])
def test_bad_flags(tmp_path, args, fragment):
    result = invoke("compare", "--methods", "lora,ia3", "--out", tmp_path / "out", *args)
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_errors_before_any_run(tmp_path, compared):
    tmp, _ = compared
    base = ["compare", "--model", tmp / "bert", "--data", tmp / "train.csv", "--eval-data", tmp / "eval.jsonl",
            "--methods", "lora", "--out", tmp_path / "out"]
    assert_clean_error(invoke(*base, "--train-sizes", "9,100"), "100", "has only 18 training records")
    assert_clean_error(invoke(*base, "--option", "lora.rank_r=4"), "unknown key 'rank_r'")
    assert not (tmp_path / "out" / "runs").exists()


def test_resume_runs_only_what_is_missing(compared):
    tmp, _ = compared
    out = tmp / "out"
    doc = _document(tmp)
    results = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    assert len(results) == 5  # prompt's runs fail before a process is started
    dropped = ("lora", 1, 18)
    doc["runs"] = [r for r in doc["runs"] if (r["method"], r["seed"], r["train_size"]) != dropped]
    (out / "compare.json").write_text(json.dumps(doc))
    # other settings are refused: the kept runs would not be comparable
    changed = [str(a) for a in compare_args(tmp, "--resume")]
    changed[changed.index("--max-steps") + 1] = "3"
    assert_clean_error(invoke(*changed), "other settings", "max_steps")
    result = invoke(*compare_args(tmp, "--resume"))
    assert result.exit_code == 0, result.output
    assert "3 of 8 runs already in" in result.stderr
    after = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    assert {name for name in after if after[name] != results[name]} == {"lora-s1-n18"}
    doc = _document(tmp)
    assert len(doc["runs"]) == len(KEYS)  # full's row, not asked for this time, is kept
    assert sum(1 for r in doc["runs"] if r["error"]) == 4  # prompt's failed runs were tried again (and failed)
    assert os.path.getsize(out / "compare.html") > 0
