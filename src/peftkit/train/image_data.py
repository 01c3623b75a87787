"""Image folders for classification: reading and checking them, preprocessing, batches.

The layout is the usual one: ``DIR/<label>/<image>``, one folder per class, the folder's name
being the label. Images are ``.png``, ``.jpg``/``.jpeg``, ``.bmp`` and ``.webp`` files (any
case), also in subfolders of a class folder; other files are ignored and counted, hidden files
and folders (a leading ``.``) are skipped. Every problem raises ``DataError`` naming the folder
or file: a missing folder, no class folders or only one, a class folder without images, a file
that is not a readable image.

Only each image's header is read up front (format and size); the pixels are decoded when the
item is fetched (``ImageFolderSet.__getitem__``), converted to RGB and preprocessed:

- with the model directory's image processor (``preprocessor_config.json``) when it has one,
  exactly as the model was pretrained;
- else resized to the model's ``image_size`` (224 when its config has none) and scaled to
  [-1, 1] (mean = std = 0.5 per channel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from .. import DataError, ModelError
from .data import Example, LabelMap, split_holdout

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_IMAGE_SIZE = 224
MEAN = STD = 0.5  # the fallback normalisation: x in [0, 1] -> (x - 0.5) / 0.5 in [-1, 1]
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageFolder:
    """What was found in one folder: (path, label) pairs in a fixed order, and what was skipped."""

    root: str
    items: tuple[tuple[str, str], ...]  # (image path, class folder name), sorted by class then path
    ignored: int  # files that are not images (by extension), in class folders or beside them

    @property
    def labels(self) -> list[str]:
        return sorted({label for _, label in self.items})

    def examples(self) -> list[Example]:
        """As ``data.Example``s (text = the image's path, line = its 1-based position)."""
        return [Example(text=path, label=label, line=i) for i, (path, label) in enumerate(self.items, 1)]


# -- reading ------------------------------------------------------------------------------


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def read_image_folder(root: str | os.PathLike, what: str = "image folder") -> ImageFolder:
    """Every image under ``root/<label>/``; checks the layout and each image's header.

    ``what`` names the folder's role in messages (``--data``, ``--eval-data``, ...).
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DataError(f"{root}: {what} not found")
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a directory; expected an {what} with one subfolder per class "
                        f"(DIR/<label>/*.png|jpg|jpeg|bmp|webp)")
    entries = sorted(e for e in os.listdir(root) if not _hidden(e))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    ignored = sum(1 for e in entries if os.path.isfile(os.path.join(root, e)))  # files beside the class folders
    if not classes:
        found = f"found {ignored} file{'s' * (ignored != 1)} and no subfolders" if ignored else "it is empty"
        raise DataError(f"{root}: no class folders ({found}); expected one subfolder per class, "
                        "named by its label, holding that class's images")
    items: list[tuple[str, str]] = []
    for label in classes:
        images, others = _images_under(os.path.join(root, label))
        if not images:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            extra = f" ({others} other file{'s' * (others != 1)} ignored)" if others else ""
            raise DataError(f"{os.path.join(root, label)}: class {label!r} has no images ({kinds}){extra}")
        items.extend((path, label) for path in images)
        ignored += others
    for path, _ in items:
        check_image(path)
    return ImageFolder(root, tuple(items), ignored)


def _images_under(folder: str) -> tuple[list[str], int]:
    """Image paths under ``folder`` (recursively, sorted, hidden entries skipped), and how many
    other files there are."""
    images, others = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in sorted(filenames):
            if _hidden(name):
                continue
            if is_image_name(name):
                images.append(os.path.join(dirpath, name))
            else:
                others += 1
    return images, others


def check_image(path: str) -> None:
    """Open ``path``'s header (cheap: no pixels are decoded); ``DataError`` when it is no image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read image: {exc}") from None
    if width < 1 or height < 1:
        raise DataError(f"{path}: image has no pixels ({width}x{height})")


def load_rgb(path: str):
    """The decoded image as an RGB ``PIL.Image`` (grey, palette and alpha images converted)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated/corrupt data
        raise DataError(f"{path}: cannot decode image (corrupt or truncated?): {exc}") from None


# -- labels and splits --------------------------------------------------------------------


def label_map(folder: ImageFolder) -> LabelMap:
    """The labels are the class folders' names (integers sort by value, as in ``LabelMap``)."""
    if len(folder.labels) < 2:
        raise DataError(f"{folder.root}: found 1 class folder ({folder.labels[0]!r}); classification needs at "
                        "least 2 (one subfolder per class)")
    return LabelMap.from_examples(folder.examples(), folder.root)


def check_eval_labels(evaluation: ImageFolder, labels: LabelMap, known_from: str) -> None:
    """Every class folder of the evaluation folder must be a known class (``known_from`` says
    where the known classes come from: the training folder, the adapter's labels.json)."""
    unknown = [label for label in evaluation.labels if label not in labels.label2id]
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        raise DataError(f"{evaluation.root}: class folder{'s' * (len(unknown) > 1)} {names} "
                        f"{'are' if len(unknown) > 1 else 'is'} not a class of {known_from} "
                        f"(its classes: {', '.join(repr(n) for n in labels.names)})")


def split_folder(folder: ImageFolder, fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of each class's images, chosen with ``seed`` (``data.split_holdout``:
    same folder + same seed -> same split)."""
    return split_holdout(folder.examples(), fraction, seed, folder.root)


# -- preprocessing ------------------------------------------------------------------------


class Preprocess:
    """An RGB ``PIL.Image`` -> (3, H, W) float32 tensor, ready for the model.

    ``processor`` is a transformers image processor (used as is) or None: then a bilinear
    resize to ``size`` (H, W) and scaling to [-1, 1].
    """

    def __init__(self, processor: Any | None, size: tuple[int, int], description: str) -> None:
        self.processor = processor
        self.size = size
        self.description = description  # for the console

    def __call__(self, image) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=image, return_tensors="pt")["pixel_values"][0].float()  # (3, H, W)
        from PIL import Image

        height, width = self.size
        resized = image.resize((width, height), Image.Resampling.BILINEAR)
        raw = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)  # (H*W*3,)
        pixels = raw.view(height, width, 3).permute(2, 0, 1).float() / 255.0  # (3, H, W) in [0, 1]
        return (pixels - MEAN) / STD


def _model_image_size(config: Any) -> tuple[int, int]:
    """(H, W) from the model config's ``image_size`` (an int or a pair), else 224."""
    size = getattr(config, "image_size", None)
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE


def load_image_processor(model_path: str) -> tuple[Any | None, str | None]:
    """The model directory's image processor, or None, with why not when it has one that fails."""
    if not os.path.isfile(os.path.join(model_path, PROCESSOR_FILE)):
        return None, None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_path), None
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError) as exc:
        text = str(exc).strip().splitlines()
        return None, text[0] if text else type(exc).__name__


def make_preprocess(model_path: str) -> Preprocess:
    """The preprocessing the model in ``model_path`` expects (see the module docstring)."""
    from transformers import AutoConfig

    processor, failure = load_image_processor(model_path)
    if processor is not None:
        return Preprocess(processor, (0, 0), f"the model's image processor ({type(processor).__name__})")
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_path}: cannot read the model's config: {exc}") from None
    size = _model_image_size(config)
    why = f"its {PROCESSOR_FILE} failed to load ({failure}); " if failure else f"no {PROCESSOR_FILE}; "
    return Preprocess(None, size, f"{why}resize to {size[0]}x{size[1]}, normalise with mean=std={MEAN}")


# -- tensors ------------------------------------------------------------------------------


class ImageFolderSet(Dataset):
    """(pixels, label id) pairs; images are decoded in ``__getitem__``, label ids checked up front."""

    def __init__(self, examples: Sequence[Example], labels: LabelMap, preprocess: Callable[[Any], torch.Tensor],
                 source: str) -> None:
        self.paths = [e.text for e in examples]
        self.label_ids = labels.ids(examples, source)
        self.labels = labels
        self.preprocess = preprocess
        self.source = source

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.paths[i]
        try:
            pixels = self.preprocess(load_rgb(path))  # (3, H, W)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - a processor failing on this image: name the file
            raise DataError(f"{path}: cannot preprocess image: {type(exc).__name__}: {exc}") from None
        return pixels, self.label_ids[i]


def collate_images(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """``{"pixel_values": (B, 3, H, W) float32, "labels": (B,) long}``."""
    pixels, labels = zip(*items)
    return {"pixel_values": torch.stack(pixels).float(), "labels": torch.tensor(labels, dtype=torch.long)}
