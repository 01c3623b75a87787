"""peftkit.train's data, options, loop and report pieces, without a model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peftkit import ConfigError, DataError
from peftkit.train.data import (DEMO_EVAL, DEMO_TRAIN, Example, LabelMap, read_examples, split_holdout)
from peftkit.train.loop import linear_schedule
from peftkit.train.methods import parse_targets
from peftkit.train.options import TrainOptions, build_options, read_yaml
from peftkit.train.report import MetricsLog, plot_loss, write_json


def write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


# -- reading ------------------------------------------------------------------------------


def test_csv_tsv_and_jsonl_read_the_same_examples(tmp_path):
    csv_path = write(tmp_path, "d.csv", 'text,label\nhello there,a\n"one, two",b\n')
    tsv_path = write(tmp_path, "d.tsv", "text\tlabel\nhello there\ta\none, two\tb\n")
    jsonl_path = write(tmp_path, "d.jsonl", '{"text": "hello there", "label": "a"}\n\n{"text": "one, two", "label": "b"}\n')
    want = [("hello there", "a"), ("one, two", "b")]
    for path in (csv_path, tsv_path, jsonl_path):
        assert [(e.text, e.label) for e in read_examples(path)] == want, path
    assert [e.line for e in read_examples(jsonl_path)] == [1, 3]  # blank line skipped, lines still counted


def test_sentence_column_bom_integer_labels_and_extra_columns(tmp_path):
    path = write(tmp_path, "d.csv", "\ufeffid,Sentence,Label\n1,good film,1\n2,bad film,0\n".encode("utf-8"))
    examples = read_examples(path)
    assert [(e.text, e.label, e.line) for e in examples] == [("good film", "1", 2), ("bad film", "0", 3)]
    jsonl = write(tmp_path, "d.jsonl", '{"sentence": "x", "label": 3}\n')
    assert read_examples(jsonl)[0].label == "3"


def test_line_numbers_follow_multiline_quoted_fields(tmp_path):
    path = write(tmp_path, "d.csv", 'text,label\n"two\nlines",a\nok,\n')
    with pytest.raises(DataError, match=r"d\.csv line 4: label '' is empty"):
        read_examples(path)


def test_unknown_extension_is_sniffed(tmp_path):
    assert read_examples(write(tmp_path, "a.txt", '{"text": "t", "label": "x"}\n'))[0].label == "x"
    assert read_examples(write(tmp_path, "b.txt", "text\tlabel\nt\ty\n"))[0].label == "y"
    assert read_examples(write(tmp_path, "c.data", "text,label\nt,z\n"))[0].label == "z"


@pytest.mark.parametrize("name, content, message", [
    ("d.csv", "", r"d\.csv: file is empty"),
    ("d.csv", "\n  \n", r"d\.csv: file is empty"),
    ("d.csv", "text,label\n", r"d\.csv: no examples \(only a header line\)"),
    ("d.csv", "sentence_text,y\nhi,a\n",
     r"d\.csv line 1: no 'text' \(or 'sentence'\) column; found columns 'sentence_text', 'y'; expected"),
    ("d.csv", "text,category\nhi,a\n", r"d\.csv line 1: no 'label' column; found columns 'text', 'category'"),
    ("d.csv", "text,label\nhi,a\nlonely\n", r"d\.csv line 3: missing 'label' column \(the row has 1 field, the header 2\)"),
    ("d.csv", "text,label\nhi,a\nhi, there,b\n", r"d\.csv line 3: 3 fields but the header has 2"),
    ("d.csv", "text,label\n ,a\n", r"d\.csv line 2: text is empty"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n', r"d\.jsonl line 2: invalid JSON"),
    ("d.jsonl", '["a", "x"]\n', r"d\.jsonl line 1: invalid JSON|line 1: expected a JSON object, found an array"),
    ("d.jsonl", '{"text": "a", "lbl": "x"}\n', r"d\.jsonl line 1: missing 'label' field; found fields 'text', 'lbl'"),
    ("d.jsonl", '{"txt": "a", "label": "x"}\n', r"d\.jsonl line 1: missing 'text' \(or 'sentence'\) field"),
    ("d.jsonl", '{"text": "a", "label": 1.5}\n', r"d\.jsonl line 1: label must be a string or an integer, found 1\.5"),
    ("d.jsonl", '{"text": "a", "label": ""}\n', r"d\.jsonl line 1: label '' is empty"),
    ("d.jsonl", '{"text": 5, "label": "x"}\n', r"d\.jsonl line 1: 'text' must be a string, found a number"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        read_examples(path)


def test_missing_file_directory_and_bad_encoding(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        read_examples(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="is a directory"):
        read_examples(str(tmp_path))
    path = write(tmp_path, "latin.csv", b"text,label\ncaf\xe9,a\n")
    with pytest.raises(DataError, match=r"latin\.csv line 2: not UTF-8 text \(byte 0xe9\)"):
        read_examples(path)


# -- labels -------------------------------------------------------------------------------


def ex(labels: list[str]) -> list[Example]:
    return [Example(text=f"t{i}", label=lab, line=i + 2) for i, lab in enumerate(labels)]


def test_label_map_orders_integers_by_value_and_strings_alphabetically():
    assert LabelMap.from_examples(ex(["1", "0", "2", "1"]), "f").label2id == {"0": 0, "1": 1, "2": 2}
    assert LabelMap.from_examples(ex(["10", "2", "-1"]), "f").names == ("-1", "2", "10")
    assert LabelMap.from_examples(ex(["pos", "neg", "10"]), "f").names == ("10", "neg", "pos")


def test_label_map_needs_two_labels_and_rejects_unknown_ones():
    with pytest.raises(DataError, match=r"f: found 1 distinct label \('a'\); classification needs at least 2"):
        LabelMap.from_examples(ex(["a", "a"]), "f")
    labels = LabelMap.from_examples(ex(["a", "b"]), "train.csv")
    with pytest.raises(DataError, match=r"eval\.csv line 3: label 'c' was not in the training data \(known labels: 'a', 'b'\)"):
        labels.ids(ex(["a", "c"]), "eval.csv")


def test_label_map_json_round_trip(tmp_path):
    labels = LabelMap(("neg", "pos"))
    write_json(tmp_path / "labels.json", labels.to_json())
    assert json.loads((tmp_path / "labels.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    assert LabelMap.read(tmp_path / "labels.json") == labels


# -- hold-out split -----------------------------------------------------------------------


def test_split_is_deterministic_stratified_and_disjoint():
    examples = ex(["a"] * 10 + ["b"] * 5 + ["c"] * 1)
    train, held = split_holdout(examples, 0.2, seed=3, source="f")
    again = split_holdout(examples, 0.2, seed=3, source="f")
    assert (train, held) == again
    assert sorted(e.label for e in held) == ["a", "a", "b"]  # 20% of each label, none of c's only one
    assert {e.line for e in train}.isdisjoint(e.line for e in held)
    assert len(train) + len(held) == len(examples)
    assert [e.line for e in held] == sorted(e.line for e in held)  # file order kept
    other = split_holdout(examples, 0.2, seed=4, source="f")[1]
    assert {e.line for e in other} != {e.line for e in held}


def test_split_of_tiny_files():
    train, held = split_holdout(ex(["a", "b", "b"]), 0.2, seed=0, source="f")
    assert len(held) == 1 and held[0].label == "b" and len(train) == 2
    with pytest.raises(DataError, match="too few examples to hold out an evaluation set; pass --eval-data"):
        split_holdout(ex(["a", "b"]), 0.2, seed=0, source="f")


# -- the bundled demo set -----------------------------------------------------------------


def test_demo_data_is_shipped_and_sound():
    train, evaluation = read_examples(DEMO_TRAIN), read_examples(DEMO_EVAL)
    assert len(train) >= 250 and len(evaluation) >= 60
    labels = LabelMap.from_examples(train, "demo")
    assert len(labels) >= 2
    labels.ids(evaluation, "demo eval")  # every eval label is known
    assert not {e.text for e in train} & {e.text for e in evaluation}
    assert len({e.text for e in train}) == len(train)
    counts = [sum(e.label == name for e in train) for name in labels.names]
    assert min(counts) >= 0.8 * max(counts)  # balanced


# -- options and YAML ---------------------------------------------------------------------


def test_yaml_keys_either_spelling_and_string_numbers(tmp_path):
    path = write(tmp_path, "c.yaml", "batch-size: 8\nmax_steps: 3\nlr: 1e-3\nalpha: 32\ntargets: [query, key]\n")
    values = read_yaml(path)
    assert values == {"batch_size": 8, "max_steps": 3, "lr": 0.001, "alpha": 32.0, "targets": ["query", "key"]}
    options = build_options(values, {"batch_size": 4, "r": None}, source=path)
    assert (options.batch_size, options.max_steps, options.r) == (4, 3, TrainOptions.r)


@pytest.mark.parametrize("content, message", [
    ("epochz: 3\n", r"c\.yaml: unknown key 'epochz'; did you mean 'epochs'\?"),
    ("r: eight\n", r"c\.yaml: key 'r': expected an integer, found 'eight'"),
    ("lr: [1]\n", r"c\.yaml: key 'lr': expected a number"),
    ("- r\n", r"c\.yaml: expected a mapping of option names to values, found list"),
    ("r: 4\n  alpha: 3\n", r"c\.yaml line 2: invalid YAML"),
    ("batch_size: 2\nbatch-size: 3\n", r"c\.yaml: key 'batch-size' is given twice"),
])
def test_yaml_errors_name_the_file_and_key(tmp_path, content, message):
    path = write(tmp_path, "c.yaml", content)
    with pytest.raises(ConfigError, match=message):
        read_yaml(path)


def test_bad_value_from_the_file_names_the_file(tmp_path):
    path = write(tmp_path, "c.yaml", "r: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: --r: expected a positive integer, found 0"):
        build_options(read_yaml(path), {}, source=path)
    with pytest.raises(ConfigError, match=r"^--dropout: expected a number in \[0, 1\), found 1\.5"):
        build_options({}, {"dropout": 1.5})


def test_parse_targets():
    assert parse_targets("query, value") == ["query", "value"]
    assert parse_targets("attention.self.query") == ["attention.self.query"]
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets(r".*\.(query|value)") == r".*\.(query|value)"
    with pytest.raises(ConfigError, match="invalid regular expression"):
        parse_targets("(query")


# -- loop and report ----------------------------------------------------------------------


def test_linear_schedule_warms_up_then_decays_to_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = linear_schedule(opt, warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])


def test_metrics_log_writes_whole_json_lines_and_replaces_old_runs(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("stale\n")
    log = MetricsLog(path)
    log.eval(0, {"accuracy": 0.5, "loss": 0.7, "n": 4})
    log.step(1, 0.69, 1e-3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 0, "eval": {"accuracy": 0.5, "loss": 0.7, "n": 4}},
                    {"step": 1, "loss": 0.69, "lr": 0.001}]
    assert log.train_points() == ([1], [0.69])


def test_atomic_writes_leave_no_temporary_files_and_normal_permissions(tmp_path):
    write_json(tmp_path / "summary.json", {"a": 1})
    plot_loss(tmp_path / "loss.png", [1, 2, 3], [0.9, 0.5, 0.4], [(3, {"accuracy": 0.8, "loss": 0.45})])
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "summary.json"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o666 & ~umask
