"""Image classification: transfer learning from a pretrained vision model on an image folder.

``peftkit train --task image-classify --model DIR --data IMAGES/`` adapts a transformers image
classifier (ViT, ConvNeXt, ...; ``AutoModelForImageClassification``) to the classes of
``IMAGES/<label>/*`` (``image_data``). The pretrained head is replaced by a new one with one
output per class, trained in full beside the adapter (``modules_to_save``); the backbone gets
the adapter (LoRA's default targets: ViT's attention query/value, ConvNeXt's pointwise layers
and the Conv2d between its stages).

``evaluate_adapter`` and ``merge_adapter`` are what ``peftkit eval`` / ``peftkit merge`` call
for a run of this task.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .. import ConfigError, ModelError
from . import rundir
from .adapted import (BASE_ID2LABEL, CLASS_INDICES, LABELS_JSON, Source, eval_data_of, load_adapted,
                      merged_model, write_out_dir)
from .data import HOLDOUT_FRACTION, Example, LabelMap
from .image_data import (PROCESSOR_FILE, ImageFolderSet, check_eval_labels, collate_images, label_map,
                         make_preprocess, read_image_folder, split_folder)
from .models import dtype_kwargs, first_line, resolve_model
from .options import TrainOptions
from .progress import Console
from .task import ClassificationTask, TaskData

AUTO_CLASS = "AutoModelForImageClassification"  # what loads a merged model (peftkit merge says so)
HEAD = "classifier"  # the head of ViT, DeiT, BEiT, Swin, ConvNeXt(V2), ResNet, ... image classifiers


class ImageClassifyTask(ClassificationTask):
    """``--task image-classify``: cross-entropy over the classes, accuracy as the metric."""

    name = "image-classify"
    peft_task_type = None  # HF PEFT has no task type for images
    modules_to_save = [HEAD]  # the new head (ViT and ConvNeXt both name it "classifier")

    def load_data(self) -> TaskData:
        if not self.options.data:
            raise ConfigError("--task image-classify: pass --data, a folder with one subfolder of images per class "
                              "(DATA/<label>/*.png|jpg|jpeg|bmp|webp)")
        model_path = resolve_model(self.options.model)
        labels, train_ex, eval_ex, eval_source, ignored = image_splits(
            self.options.data, self.options.eval_data, HOLDOUT_FRACTION, self.options.seed)
        self.labels = labels
        preprocess = make_preprocess(model_path)
        train = ImageFolderSet(train_ex, labels, preprocess, self.options.data)
        evaluation = ImageFolderSet(eval_ex, labels, preprocess, self.options.eval_data or self.options.data)
        lines = [f"labels: {', '.join(labels.names)}", f"preprocessing: {preprocess.description}"]
        if ignored:
            lines.append(f"ignored: {ignored} file{'s' * (ignored != 1)} that are not images "
                         "(.png, .jpg, .jpeg, .bmp, .webp)")
        return TaskData(train=train, eval=evaluation, collate=collate_images, train_source=self.options.data,
                        eval_source=eval_source, lines=lines)

    def load_model(self, data: TaskData, device: torch.device) -> tuple[nn.Module, str]:
        path = resolve_model(self.options.model)
        return load_image_classifier(path, self.labels, device), path


# -- data ---------------------------------------------------------------------------------


def image_splits(data: str, eval_data: str | None, fraction: float, seed: int
                 ) -> tuple[LabelMap, list[Example], list[Example], str, int]:
    """Labels, training and evaluation examples, the evaluation data's description, and the
    number of ignored files. Without ``eval_data``, ``fraction`` of each class is held out of
    ``data`` with ``seed``."""
    train_folder = read_image_folder(data, "--data image folder")
    labels = label_map(train_folder)
    if eval_data:
        eval_folder = read_image_folder(eval_data, "--eval-data image folder")
        check_eval_labels(eval_folder, labels, f"the training folder {data}")
        ignored = train_folder.ignored + eval_folder.ignored
        return labels, train_folder.examples(), eval_folder.examples(), eval_data, ignored
    train_ex, eval_ex = split_folder(train_folder, fraction, seed)
    return labels, train_ex, eval_ex, f"{data} (held-out {fraction:.0%})", train_folder.ignored


# -- model --------------------------------------------------------------------------------


def load_image_classifier(path: str, labels: LabelMap, device: torch.device) -> nn.Module:
    """``AutoModelForImageClassification`` with one output per label, in float32, on ``device``.

    A head of another size in the checkpoint is replaced by a new one (it is trained anyway).
    """
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    try:
        config = AutoConfig.from_pretrained(path)
        if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
            raise ModelError(f"{path}: a {config.model_type!r} model is not an image classifier; pass --model with "
                             "an AutoModelForImageClassification model directory (ViT, ConvNeXt, Swin, ...)")
        model = AutoModelForImageClassification.from_pretrained(
            path, num_labels=len(labels), id2label=labels.id2label, label2id=labels.label2id,
            ignore_mismatched_sizes=True, **dtype_kwargs(),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot load an image classification model: {first_line(exc)}") from None
    channels = getattr(model.config, "num_channels", 3)
    if channels != 3:
        raise ModelError(f"{path}: the model takes {channels}-channel images; image folders are read as RGB (3)")
    return model.to(device)


# -- using a trained adapter --------------------------------------------------------------


def _build(device: torch.device):
    """``load_adapted``'s builder: the base classifier with one output per label of the adapter
    (``labels.json``, else the base config's names or class indices: ``adapted.class_labels``)."""
    def build(source: Source) -> nn.Module:
        return load_image_classifier(source.model_path, source.labels().config_names, device)
    return build


def evaluate_adapter(adapter: str | Source, model: str | None, data: str | None, batch_size: int | None,
                     device: torch.device, console: Console, allow_pickle: bool = False) -> dict[str, Any]:
    """``{"accuracy", "loss", "n", "labels_from"}`` of an adapter on an image folder, preprocessed
    as in training.

    Without ``data``: the run's evaluation images (its ``--eval-data``, or the same part of its
    ``--data`` held out with the run's seed and fraction)."""
    adapted = load_adapted(adapter, model, device, _build(device), allow_pickle=allow_pickle)
    labels = adapted.source.labels()
    path, held_out = eval_data_of(adapted.args, data)
    folder = read_image_folder(path, "--data image folder" if data else "the run's evaluation folder")
    if held_out:
        fraction = float(adapted.args.get("holdout_fraction", HOLDOUT_FRACTION))
        _, examples = split_folder(folder, fraction, int(adapted.args.get("seed", 0)))
    else:
        known_from = {LABELS_JSON: f"the adapter's {rundir.LABELS_FILE}", BASE_ID2LABEL: labels.where,
                      CLASS_INDICES: f"the adapter's {len(labels.names)}-output head (class indices; no "
                                     f"{rundir.LABELS_FILE} and the base config names no labels)"}[labels.source]
        check_eval_labels(folder, labels.names, known_from)
        examples = folder.examples()
    preprocess = make_preprocess(adapted.model_path)
    dataset = ImageFolderSet(examples, labels.names, preprocess, path)
    size = batch_size or int(adapted.args.get("batch_size") or TrainOptions.batch_size)
    loader = DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=collate_images)
    console.info(adapted.source.line())
    console.info(labels.line())
    console.info(f"evaluating {adapted.adapter_dir} on {len(dataset)} images from {path}"
                 + (" (held-out part)" if held_out else ""))
    with console.progress(len(loader), "eval", lines=False) as bar:
        result = ImageClassifyTask(TrainOptions()).evaluate(adapted.model, loader, device, progress=bar)
    return {**result, "labels_from": labels.source}


def merge_adapter(adapter: str | Source, model: str | None, out: str, console: Console, quantized: bool = False,
                  allow_pickle: bool = False) -> Path:
    """Fold the adapter (and its trained head) into the base; write an image classifier directory
    (as a whole: ``write_out_dir``).

    The directory loads with ``AutoModelForImageClassification.from_pretrained`` (labels in its
    config) and holds the base's image processor when the base has one."""
    cpu = torch.device("cpu")
    adapted = load_adapted(adapter, model, cpu, _build(cpu), quantized, allow_pickle)
    labels = adapted.source.labels()
    console.info(adapted.source.line())
    console.info(labels.line())
    merged = merged_model(adapted, console)
    merged.config.id2label = dict(labels.config_names.id2label)
    merged.config.label2id = dict(labels.config_names.label2id)
    processor = Path(adapted.model_path) / PROCESSOR_FILE

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        if processor.is_file():
            shutil.copyfile(processor, tmp / PROCESSOR_FILE)

    out_dir = write_out_dir(out, fill, keep=[adapted.model_path, adapted.adapter_dir])
    console.info(f"merged {adapted.adapter_dir} into {adapted.model_path}")
    return out_dir
