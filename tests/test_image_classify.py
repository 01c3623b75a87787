"""The image-classification task: image folders, preprocessing, the task's model and metrics,
LoRA's default targets on ViT and ConvNeXt (and HF PEFT loading them).

Everything runs on tiny random-weight models saved to temporary directories and on small
generated PNGs whose class is their dominant colour (easy to separate).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import ConfigError, DataError, ModelError
from peftkit.train.data import Example
from peftkit.train.image_classify import ImageClassifyTask, image_splits
from peftkit.train.task import classification_sums
from peftkit.train.image_data import (ImageFolderSet, _model_image_size, collate_images, label_map, make_preprocess,
                                      read_image_folder, split_folder)
from peftkit.train.options import TrainOptions

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SIZE = 32


def _image(colour: tuple[int, int, int], seed: int, size: int = SIZE):
    """A ``size``x``size`` RGB image: ``colour`` plus uniform noise in [-40, 40] per pixel."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(-40, 41, (size, size, 3), generator=g)
    pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8)
    return Image.frombytes("RGB", (size, size), pixels.numpy().tobytes())


def make_folder(root: Path, per_class: int, seed: int = 0, classes=COLOURS) -> Path:
    """``root/<colour>/<i>.png`` for each class."""
    for c, (name, colour) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _image(colour, seed * 10_000 + c * 1000 + i).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def images(workdir) -> Path:
    return make_folder(workdir / "train", per_class=10)


@pytest.fixture(scope="module")
def eval_images(workdir) -> Path:
    return make_folder(workdir / "eval", per_class=4, seed=1)


@pytest.fixture(scope="module")
def tiny_vit(workdir) -> str:
    """A 2-layer ViT on 32x32 images (patches of 8) with its image processor saved beside it."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=2)
    path = workdir / "tiny-vit"
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_convnext(workdir) -> str:
    """A 2-stage ConvNeXt (8 and 16 channels), no image processor: the fallback preprocessing."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    cfg = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=SIZE, num_labels=5)
    path = workdir / "tiny-convnext"
    ConvNextForImageClassification(cfg).save_pretrained(path)
    return str(path)


# -- reading folders ----------------------------------------------------------------------


def test_folder_is_read_with_labels_extensions_and_ignored_files(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2, classes={"cat": (200, 0, 0), "dog": (0, 0, 200)})
    _image((0, 0, 200), 7).save(root / "dog" / "upper.PNG")
    _image((0, 0, 200), 8).save(root / "dog" / "photo.Jpeg")
    _image((0, 0, 200), 9).save(root / "dog" / "bitmap.bmp")
    (root / "dog" / "more").mkdir()
    _image((0, 0, 200), 10).save(root / "dog" / "more" / "nested.webp")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("beside the class folders")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")  # hidden: skipped, not counted
    (root / ".cache").mkdir()  # hidden folder: not a class
    folder = read_image_folder(root)
    assert folder.labels == ["cat", "dog"]
    names = [os.path.relpath(p, root) for p, _ in folder.items]
    assert names == ["cat/000.png", "cat/001.png", "dog/000.png", "dog/001.png", "dog/bitmap.bmp",
                     "dog/photo.Jpeg", "dog/upper.PNG", "dog/more/nested.webp"]
    assert folder.ignored == 2


def _garbage_png(root: Path) -> str:
    path = root / "green" / "broken.png"
    path.write_bytes(b"this is not a png")
    return str(path)


def _truncated_png(root: Path) -> str:
    path = root / "green" / "truncated.png"
    full = root / "green" / "000.png"
    path.write_bytes(full.read_bytes()[:120])  # the header survives, the pixel data does not
    return str(path)


@pytest.mark.parametrize("case", ["missing", "a file", "empty", "one class", "class without images", "garbage"])
def test_folder_errors_name_the_path(tmp_path, case):
    root = tmp_path / "data"
    if case == "a file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
        (root / "stray.png").write_bytes(b"")
    elif case == "one class":
        make_folder(root, 2, classes={"only": (1, 2, 3)})
    elif case == "class without images":
        make_folder(root, 2)
        (root / "purple").mkdir()
        (root / "purple" / "readme.txt").write_text("x")
    elif case == "garbage":
        make_folder(root, 2)
        where = _garbage_png(root)
    expected = {"missing": (str(root), "not found"), "a file": (str(root), "not a directory"),
                "empty": (str(root), "no class folders", "1 file"), "one class": (str(root), "'only'", "at least 2"),
                "class without images": (str(root / "purple"), "no images", "1 other file"),
                "garbage": (where if case == "garbage" else "", "not a readable image")}[case]
    with pytest.raises(DataError) as info:
        image_splits(str(root), None, 0.2, 0)
    for fragment in expected:
        assert fragment in str(info.value)


def test_corrupt_pixels_are_reported_when_the_image_is_loaded(tmp_path, tiny_convnext):
    root = make_folder(tmp_path / "data", 2)
    where = _truncated_png(root)
    folder = read_image_folder(root)  # the header is fine
    labels = label_map(folder)
    dataset = ImageFolderSet(folder.examples(), labels, make_preprocess(tiny_convnext), str(root))
    i = dataset.paths.index(where)
    with pytest.raises(DataError, match="truncated.png: cannot decode image"):
        dataset[i]


def test_eval_folder_with_a_class_unknown_to_training(tmp_path, images):
    root = make_folder(tmp_path / "eval", 1, classes={"red": (200, 0, 0), "yellow": (200, 200, 0)})
    with pytest.raises(DataError) as info:
        image_splits(str(images), str(root), 0.2, 0)
    assert str(root) in str(info.value) and "'yellow'" in str(info.value) and str(images) in str(info.value)


def test_eval_folder_may_hold_fewer_classes(tmp_path, images):
    root = make_folder(tmp_path / "eval", 2, classes={"red": (200, 0, 0)})
    labels, train, evaluation, source, _ = image_splits(str(images), str(root), 0.2, 0)
    assert labels.names == ("blue", "green", "red") and len(train) == 30 and len(evaluation) == 2
    assert source == str(root)


def test_holdout_is_stratified_and_deterministic(images):
    folder = read_image_folder(images)
    train, held = split_folder(folder, 0.2, seed=3)
    assert split_folder(folder, 0.2, seed=3) == (train, held)
    assert split_folder(folder, 0.2, seed=4) != (train, held)
    assert sorted(e.text for e in train + held) == sorted(p for p, _ in folder.items)
    assert {e.label: sum(x.label == e.label for x in held) for e in held} == {"blue": 2, "green": 2, "red": 2}


# -- preprocessing ------------------------------------------------------------------------


def test_preprocessing_with_the_models_image_processor(tiny_vit):
    from PIL import Image

    preprocess = make_preprocess(tiny_vit)
    assert preprocess.processor is not None and "image processor" in preprocess.description
    for image in (_image((255, 255, 255), 0, size=20), Image.new("L", (40, 24), 255)):
        x = preprocess(image.convert("RGB"))
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32


def test_fallback_preprocessing_resizes_and_scales_to_plus_minus_one(tiny_convnext, tmp_path):
    from PIL import Image

    preprocess = make_preprocess(tiny_convnext)
    assert preprocess.processor is None and preprocess.size == (SIZE, SIZE)
    x = preprocess(Image.new("RGB", (50, 10), (255, 0, 128)))
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(SIZE, SIZE)) and torch.allclose(x[1], -torch.ones(SIZE, SIZE))
    assert _model_image_size(object()) == (224, 224)
    assert _model_image_size(type("C", (), {"image_size": [24, 40]})()) == (24, 40)


def test_dataset_converts_to_rgb_and_collates(tmp_path, tiny_convnext):
    from PIL import Image

    root = make_folder(tmp_path / "data", 1)
    Image.new("L", (16, 16), 100).save(root / "red" / "grey.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 10)).save(root / "blue" / "alpha.png")
    Image.new("P", (16, 16)).save(root / "green" / "palette.bmp")
    folder = read_image_folder(root)
    labels = label_map(folder)
    dataset = ImageFolderSet(folder.examples(), labels, make_preprocess(tiny_convnext), str(root))
    batch = collate_images([dataset[i] for i in range(len(dataset))])
    assert batch["pixel_values"].shape == (6, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 0, 1, 1, 2, 2]


# -- the task -----------------------------------------------------------------------------


def _task(model: str, data: Path, **kw) -> ImageClassifyTask:
    return ImageClassifyTask(TrainOptions(model=model, data=str(data), **kw))


@pytest.mark.parametrize("which", ["vit", "convnext"])
def test_task_loads_data_and_a_model_with_a_new_head(which, tiny_vit, tiny_convnext, images):
    task = _task(tiny_vit if which == "vit" else tiny_convnext, images)
    data = task.load_data()
    assert (len(data.train), len(data.eval)) == (24, 6)
    assert "labels: blue, green, red" in data.lines and "held-out 20%" in data.eval_source
    model, path = task.load_model(data, torch.device("cpu"))
    assert path == (tiny_vit if which == "vit" else tiny_convnext)
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}
    assert model.classifier.out_features == 3 and next(model.parameters()).dtype == torch.float32
    batch = data.collate([data.train[i] for i in range(4)])
    assert model(**batch).logits.shape == (4, 3)
    assert task.loss_sum(model, batch).shape == ()


def test_task_without_data_or_with_a_text_model(tmp_path, images):
    from transformers import BertConfig, BertForSequenceClassification

    with pytest.raises(ConfigError, match="--data"):
        ImageClassifyTask(TrainOptions(model=str(tmp_path))).load_data()
    bert = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32)).save_pretrained(bert)
    task = _task(str(bert), images)
    data = task.load_data()
    with pytest.raises(ModelError, match=f"{bert}: a .bert. model is not an image classifier"):
        task.load_model(data, torch.device("cpu"))


class _Fixed(torch.nn.Module):
    """Returns the given logits whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, pixel_values):
        return type("Out", (), {"logits": self.logits})()


def test_eval_sums_respect_keep_and_finish_eval_averages():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 5.0]])  # predicts 0, 1, 0, 1
    batch = {"pixel_values": torch.zeros(4, 3, 2, 2), "labels": torch.tensor([0, 0, 0, 1])}
    keep = torch.tensor([True, True, True, False])
    sums = classification_sums(_Fixed(logits), batch, keep)
    losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    assert sums["correct"] == 2 and sums["n"] == 3
    assert sums["loss_sum"] == pytest.approx(float(losses[:3].sum()))
    task = ImageClassifyTask(TrainOptions())
    assert task.eval_sums(_Fixed(logits), batch, keep) == sums
    result = task.finish_eval({"correct": 5.0, "loss_sum": 3.0, "n": 8.0})
    assert result == {"accuracy": 0.625, "loss": 0.375, "n": 8}
    assert task.eval_text(result) == "accuracy 0.6250 (loss 0.3750, n=8)"


def test_save_files_writes_labels(tmp_path, tiny_convnext, images):
    task = _task(tiny_convnext, images)
    data = task.load_data()
    task.save_files(tmp_path, data)
    saved = json.loads((tmp_path / "labels.json").read_text())
    assert saved == {"id2label": {"0": "blue", "1": "green", "2": "red"}, "label2id": {"blue": 0, "green": 1, "red": 2}}


# -- LoRA on the image models -------------------------------------------------------------


def _adapted(task: ImageClassifyTask, **config):
    from peftkit.train.methods import build_config

    data = task.load_data()
    model, _ = task.load_model(data, torch.device("cpu"))
    options = TrainOptions(r=4, alpha=8, **config)
    peftkit.apply(model, build_config(options, task.peft_task_type, task.modules_to_save))
    return model, data


def _lora_modules(model) -> dict[str, str]:
    """Adapted module name -> the wrapped layer's class name."""
    from peftkit.layer import AdapterLayer

    return {n: type(m.base_layer).__name__ for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def test_lora_defaults_on_vit_adapt_attention(tiny_vit, images):
    model, _ = _adapted(_task(tiny_vit, images))
    leaves = sorted({n.rsplit(".", 1)[-1] for n in _lora_modules(model)})
    assert leaves == ["q_proj", "v_proj"] and len(_lora_modules(model)) == 4
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vit", "classifier"}  # the adapter and the new head


def test_lora_defaults_on_convnext_adapt_conv2d_and_pointwise_layers(tiny_convnext, images):
    model, _ = _adapted(_task(tiny_convnext, images))
    assert _lora_modules(model) == {
        "convnext.encoder.stages.0.layers.0.pwconv1": "Linear",
        "convnext.encoder.stages.0.layers.0.pwconv2": "Linear",
        "convnext.encoder.stages.1.downsampling_layer.1": "Conv2d",
        "convnext.encoder.stages.1.layers.0.pwconv1": "Linear",
        "convnext.encoder.stages.1.layers.0.pwconv2": "Linear",
    }


def test_lora_on_depthwise_conv_is_refused_naming_the_layer(tiny_convnext, images):
    with pytest.raises(ConfigError, match=r"stages\.0\.layers\.0\.dwconv'.*groups=8"):
        _adapted(_task(tiny_convnext, images), targets="dwconv")
    model, _ = _adapted(_task(tiny_convnext, images), targets="patch_embeddings")  # a dense Conv2d
    assert _lora_modules(model) == {"convnext.embeddings.patch_embeddings": "Conv2d"}


@pytest.mark.parametrize("which", ["vit", "convnext"])
def test_hf_peft_loads_the_image_adapter_with_equal_logits(which, tiny_vit, tiny_convnext, images, tmp_path):
    peft = pytest.importorskip("peft")
    task = _task(tiny_vit if which == "vit" else tiny_convnext, images)
    model, data = _adapted(task)
    with torch.no_grad():  # move B (zero at init) and the head away from the base
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    batch = data.collate([data.eval[i] for i in range(3)])
    with torch.no_grad():
        expected = model(pixel_values=batch["pixel_values"]).logits
    peftkit.save(model, tmp_path / "adapter")
    base, _ = task.load_model(data, torch.device("cpu"))
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = theirs(pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_example_paths_are_kept(images):
    folder = read_image_folder(images)
    assert all(isinstance(e, Example) and os.path.isfile(e.text) for e in folder.examples())


# -- the command line ---------------------------------------------------------------------


def _cli(*args: str):
    from click.testing import CliRunner

    from peftkit.cli import cli

    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def vit_run(workdir, tiny_vit, images) -> Path:
    """One short LoRA run on the tiny ViT, the task inferred from the folder; shared by the tests below."""
    out = workdir / "vit-run"
    _cli("train", "--model", tiny_vit, "--data", str(images), "--max-steps", "12", "--batch-size", "8",
         "--lr", "1e-2", "--out", str(out), "--quiet")
    return out


def test_train_raises_accuracy_on_the_held_out_images(vit_run):
    summary = json.loads((vit_run / "summary.json").read_text())
    assert summary["eval_before"]["n"] == summary["eval"]["n"] == 6
    assert summary["eval"]["accuracy"] >= 0.8 > summary["eval_before"]["accuracy"]
    assert summary["task"] == "image-classify" and summary["labels"] == sorted(summary["labels"])
    assert summary["eval"]["loss"] < summary["eval_before"]["loss"]
    args = json.loads((vit_run / "adapter" / "train_args.json").read_text())
    assert args["task"] == "image-classify"
    assert json.loads((vit_run / "adapter" / "labels.json").read_text())["id2label"] == {
        "0": "blue", "1": "green", "2": "red"}
    config = json.loads((vit_run / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]


def test_eval_agrees_with_the_run_and_takes_other_folders(vit_run, eval_images):
    summary = json.loads((vit_run / "summary.json").read_text())
    held_out = json.loads(_cli("eval", "--adapter", str(vit_run), "--quiet").output)
    assert held_out["n"] == summary["eval"]["n"] and held_out["accuracy"] == summary["eval"]["accuracy"]
    assert held_out["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)
    other = json.loads(_cli("eval", "--adapter", str(vit_run), "--data", str(eval_images), "--quiet").output)
    assert other["n"] == 12 and other["accuracy"] >= 0.8


def test_merge_writes_an_image_classifier_with_the_adapters_outputs(vit_run, tiny_vit, images, workdir):
    from transformers import AutoModelForImageClassification

    from peftkit.train.adapted import load_adapted
    from peftkit.train.image_classify import _build

    out = workdir / "vit-merged"
    _cli("merge", "--adapter", str(vit_run), "--out", str(out), "--quiet")
    assert (out / "preprocessor_config.json").is_file()
    merged = AutoModelForImageClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "blue", 1: "green", 2: "red"}
    cpu = torch.device("cpu")
    adapted = load_adapted(str(vit_run), None, cpu, _build(cpu)).model
    data = _task(tiny_vit, images).load_data()
    batch = data.collate([data.eval[i] for i in range(len(data.eval))])
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=batch["pixel_values"]).logits,
                                   adapted(pixel_values=batch["pixel_values"]).logits, rtol=1e-4, atol=1e-5)


def test_convnext_run_with_an_eval_folder(workdir, tiny_convnext, images, eval_images):
    out = workdir / "convnext-run"
    _cli("train", "--task", "image-classify", "--model", tiny_convnext, "--data", str(images),
         "--eval-data", str(eval_images), "--max-steps", "3", "--batch-size", "10", "--out", str(out), "--quiet")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["n"] == 12
    result = json.loads(_cli("eval", "--adapter", str(out), "--quiet").output)
    assert result["n"] == 12 and result["accuracy"] == summary["eval"]["accuracy"]
    _cli("merge", "--adapter", str(out), "--out", str(workdir / "convnext-merged"), "--quiet")
    assert not (workdir / "convnext-merged" / "preprocessor_config.json").exists()  # the base has none


def test_cli_data_error_is_one_clear_line(tmp_path, tiny_vit):
    from click.testing import CliRunner

    from peftkit.cli import cli

    root = make_folder(tmp_path / "data", 2)
    where = _garbage_png(root)
    result = CliRunner().invoke(cli, ["train", "--task", "image-classify", "--model", tiny_vit, "--data", str(root),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and where in result.output and "Traceback" not in result.output


def test_eval_on_a_folder_with_an_unknown_class(tmp_path, vit_run):
    from click.testing import CliRunner

    from peftkit.cli import cli

    root = make_folder(tmp_path / "eval", 1, classes={"red": (200, 0, 0), "yellow": (200, 200, 0)})
    result = CliRunner().invoke(cli, ["eval", "--adapter", str(vit_run), "--data", str(root)])
    assert result.exit_code != 0 and "'yellow' is not a class of the adapter's labels.json" in result.output
