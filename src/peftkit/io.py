"""Save and load adapters in Hugging Face PEFT's on-disk format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``; tensor keys are
``base_model.model.<module path>.<suffix>`` (``lora_A.weight``, ``lora_embedding_A``, …), a
``modules_to_save`` module under its own path (``base_model.model.classifier.weight``) and,
with ``bias != "none"``, biases under their in-model path (``….query.base_layer.bias``).

Loading is strict: a missing or unexpected key, or a shape that does not fit the base, is an
``AdapterFileError`` naming the key (and both shapes), and the model is left as it was.
Pickle files (``adapter_model.bin``) are read only with ``allow_pickle=True``, and then with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from . import adapters as ops
from .config import CONFIG_NAME
from .errors import AdapterFileError, ConfigError, ModelError
from .inject import adapter_parameters, apply
from .layer import FILE_PREFIX as PREFIX
from .layer import AdapterLayer, Host
from .registry import config_from_dict, method_for
from .state import check_name, get_state, has_adapters, hosts
from .targeting import logical_modules

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def _new_file_mode() -> int:
    """The mode ``open`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600 files; others may need to read ours
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The live tensors adapter ``name`` owns, keyed as in HF PEFT's file."""
    config = get_state(model).configs[name]
    out: dict[str, torch.Tensor] = {}
    for path, host in hosts(model):
        if name in host.names():
            out.update(host.file_tensors(name, path))
    prefix = method_for(config).module_prefix
    if prefix != PREFIX:
        out = {prefix + k[len(PREFIX):] if k.startswith(PREFIX) else k: t for k, t in out.items()}
    bias = getattr(config, "bias", "none")
    if bias != "none":
        for path, module in logical_modules(model):
            if isinstance(module, AdapterLayer):
                if (bias == "all" or name in module.adapters) and module.bias is not None:
                    out[f"{PREFIX}{path}.base_layer.bias"] = module.bias
            elif bias == "all" and not isinstance(module, Host):
                b = module._parameters.get("bias")
                if b is not None:
                    out[f"{PREFIX}{path}.bias" if path else f"{PREFIX}bias"] = b
    return out


def save(model: nn.Module, directory: str | os.PathLike, name: str = "default",
         tensors: dict[str, torch.Tensor] | None = None) -> str:
    """Write adapter ``name`` into ``directory`` (created if needed); returns the directory.

    ``tensors``: the adapter's tensors as ``adapter_tensors`` keys them, when they are not the
    live ones (a trainer that gathered the shards of a sharded model passes them here).
    """
    state = get_state(model)
    config = check_name(state, name)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    live = adapter_tensors(model, name)
    if tensors is not None and set(tensors) != set(live):
        raise ModelError(f"save: the tensors given do not match adapter {name!r} "
                         f"({len(tensors)} keys given, {len(live)} expected)")
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in (tensors or live).items()}
    data = config.file_dict(state.targets.get(name, []))
    data["inference_mode"] = True
    write_atomic(os.path.join(directory, WEIGHTS_NAME), safetensors_bytes(tensors, metadata={"format": "pt"}))
    write_atomic(os.path.join(directory, CONFIG_NAME), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return directory


def read_config(directory: str | os.PathLike):
    """Read and validate ``adapter_config.json`` of an adapter directory."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isdir(directory):
        raise AdapterFileError(f"{directory}: adapter directory not found")
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: not found (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
    try:
        return config_from_dict(data, source=path)
    except ConfigError as exc:
        raise AdapterFileError(str(exc)) from None


def read_tensors(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    directory = os.fspath(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFileError(f"{path}: unreadable safetensors file: {exc}") from None
    pickle_path = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(pickle_path):
        if not allow_pickle:
            raise AdapterFileError(
                f"{pickle_path}: a pickle file can run code when read; pass allow_pickle=True to read it "
                "(with torch.load(weights_only=True)) if you trust it"
            )
        try:
            return torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise AdapterFileError(f"{pickle_path}: unreadable: {exc}") from None
    raise AdapterFileError(f"{directory}: no {WEIGHTS_NAME} (nor {PICKLE_NAME})")


def load(model: nn.Module, directory: str | os.PathLike, name: str = "default", trainable: bool = False,
         allow_pickle: bool = False) -> nn.Module:
    """Load an adapter saved by peftkit or HF PEFT into ``model`` under ``name``.

    The adapter becomes the active one; its parameters train only with ``trainable=True``.
    """
    config = read_config(directory)
    tensors = read_tensors(directory, allow_pickle)
    # A file holds what inference uses (HF PEFT's inference_mode): for P-tuning and projected
    # prefixes that is the prompt itself, so the adapter is built without its training encoder.
    config.inference_mode = True
    before_active = get_state(model).active if has_adapters(model) else []
    before_grad = [(p, p.requires_grad) for p in model.parameters()]
    apply(model, config, name)
    try:
        _fill(model, name, tensors, os.fspath(directory))
    except BaseException:  # leave the model exactly as it was
        ops.delete(model, name)
        if before_active:
            ops.set_active(model, before_active)
        for p, flag in before_grad:
            p.requires_grad_(flag)
        raise
    if not trainable:
        for p in adapter_parameters(model, name):
            p.requires_grad_(False)
    return model


def optional_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor | None]:
    """Keys HF PEFT may write beside the adapter's own, and where they go (None: ignored).

    - the base weight of an adapted embedding (``save_embedding_layers``: HF writes it when an
      embedding or LM head is targeted, for vocabularies that were resized); loaded into the base;
    - with ``bias != "none"``, the internal ``modules_to_save.<p>`` / ``original_module.<p>`` copies
      of a saved module's biases, duplicates of ``<path>.<p>``.
    """
    out: dict[str, torch.Tensor | None] = {}
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer) and name in host.adapters and isinstance(host.base_layer, nn.Embedding):
            out[f"{PREFIX}{path}.base_layer.weight"] = host.base_layer.weight
        elif name in host.names() and not isinstance(host, AdapterLayer):
            for key in host.file_tensors(name, path):
                param = key[len(PREFIX) + len(path) + 1:]
                out[f"{PREFIX}{path}.modules_to_save.{param}"] = None
                out[f"{PREFIX}{path}.original_module.{param}"] = None
    return out


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = adapter_tensors(model, name)
    optional = {k: t for k, t in optional_tensors(model, name).items() if k in tensors and k not in expected}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(optional))
    expected.update({k: t for k, t in optional.items() if t is not None})
    if missing:
        raise AdapterFileError(f"{source}: missing key {missing[0]}" + _more(missing))
    if unexpected:
        raise AdapterFileError(f"{source}: unexpected key {unexpected[0]}" + _more(unexpected)
                               + " (does the adapter belong to this model?)")
    for key, target in expected.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise AdapterFileError(
                f"{source}: key {key} has shape {tuple(tensors[key].shape)} in the file but "
                f"{tuple(target.shape)} in the model"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
