"""Save and load adapters in Hugging Face PEFT's on-disk format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``; tensor keys are
``base_model.model.<module path>.<suffix>`` (``lora_A.weight``, ``lora_embedding_A``, …), a
``modules_to_save`` module under its own path (``base_model.model.classifier.weight``) and,
with ``bias != "none"``, biases under their in-model path (``….query.base_layer.bias``).

Loading is strict: a missing or unexpected key, or a shape that does not fit the base, is an
``AdapterFileError`` naming the key (and both shapes), and the model is left as it was.
Pickle files (``adapter_model.bin``) are read only with ``allow_pickle=True``, and then with
``torch.load(weights_only=True)``.

A LoRA file whose ``init_lora_weights`` writes into the base (PiSSA, OLoRA, LoftQ) is loaded as
HF PEFT loads it: the init runs again on the fresh base, then A and B come from the file (its
keys and shapes are checked first, against a build without the init). ``save(plain_lora=...)``
writes such an adapter converted to a plain LoRA instead (``methods/lora_init.py``,
``docs/lora_init.md``).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import warnings

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from . import adapters as ops
from . import atomic, tokens
from .atomic import write_atomic  # noqa: F401 - peftkit.io.write_atomic, as before
from .config import CONFIG_NAME
from .errors import AdapterFileError, ConfigError, ModelError, PeftkitWarning
from .inject import adapter_parameters, build, check_adapter_name
from .layer import FILE_PREFIX as PREFIX
from .layer import AdapterLayer, Host, SavedModule
from .methods import lora_init
from .registry import config_from_dict, method_for
from .state import check_name, get_state, has_adapters, hosts
from .targeting import logical_modules

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


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
         tensors: dict[str, torch.Tensor] | None = None, *, plain_lora: bool | None = None) -> str:
    """Write adapter ``name`` into ``directory`` (created if needed); returns the directory.

    The directory is built whole in a hidden temporary sibling and renamed into place, so a
    crash leaves the old adapter or the new one, never a new weights file with an old config.
    Other files of an existing ``directory`` (``labels.json``, a user's notes) are carried
    over into the new one. ``tensors``: the adapter's tensors as ``adapter_tensors`` keys them,
    when they are not the live ones (a trainer that gathered the shards of a sharded model
    passes them here).

    ``plain_lora``: for a LoRA adapter whose init changed the base weights (PiSSA, OLoRA), True
    writes it converted to a plain LoRA of twice the rank against the untouched base (HF PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)``; ``lora_init``), which
    loads anywhere a LoRA loads and beside other adapters; False writes it as trained (with its
    ``init_lora_weights``: a loader runs the init again on the fresh base). None (default):
    converted for ``pissa_niter_N`` (a randomized SVD cannot be run again to the same base),
    as trained otherwise. An adapter whose init left the base alone is a plain LoRA already.
    """
    weights, config_text = _adapter_files(model, name, tensors, plain_lora)
    directory = os.fspath(directory)
    if _in_place_only(directory):  # the working directory or a mount point cannot be renamed
        _write_files(directory, weights, config_text)
    else:
        atomic.write_dir(directory, lambda tmp: _write_files(tmp, weights, config_text), carry=True)
    return directory


def write_files(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                tensors: dict[str, torch.Tensor] | None = None, *, plain_lora: bool | None = None) -> None:
    """Write adapter ``name``'s two files into the existing ``directory``, one after the other
    (each atomically): for a caller that builds a whole directory with ``atomic.write_dir``.
    ``plain_lora``: as for ``save``."""
    _write_files(os.fspath(directory), *_adapter_files(model, name, tensors, plain_lora))


def _adapter_files(model: nn.Module, name: str, tensors: dict[str, torch.Tensor] | None,
                   plain_lora: bool | None = None) -> tuple[bytes, bytes]:
    """(the safetensors bytes, the config JSON) of adapter ``name``."""
    state = get_state(model)
    config = check_name(state, name)
    live = adapter_tensors(model, name)
    if tensors is not None and set(tensors) != set(live):
        raise ModelError(f"save: the tensors given do not match adapter {name!r} "
                         f"({len(tensors)} keys given, {len(live)} expected)")
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in (tensors or live).items()}
    data = config.file_dict(state.targets.get(name, []))
    data["inference_mode"] = True
    if _converting(config, plain_lora):
        tensors = _converted_tensors(model, name, tensors)
        data.update(lora_init.converted_config_fields(config))
    return (safetensors_bytes(tensors, metadata={"format": "pt"}),
            (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _converting(config, plain_lora: bool | None) -> bool:
    """Whether a save writes the adapter converted to a plain LoRA (``save``'s ``plain_lora``)."""
    init = getattr(config, "init_lora_weights", None) if config.peft_type == "LORA" else None
    if plain_lora is not None and not isinstance(plain_lora, bool):
        raise ConfigError(f"plain_lora: expected True, False or None, found {plain_lora!r}")
    if init is None or not lora_init.modifies_base(init):
        return False  # a plain LoRA already (or not a LoRA: nothing to convert)
    if lora_init.kind(init) == "loftq":
        if plain_lora:
            raise ConfigError("plain_lora: a LoftQ adapter is trained against its quantized base, not the float "
                              "one, so it has no plain-LoRA form; save it as trained (plain_lora=False)")
        return False
    return plain_lora if plain_lora is not None else not lora_init.reloads_exactly(init)


def _converted_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every LoRA pair ``(A, B)`` replaced by ``([A ; A₀], [B | −B₀])`` (rank 2r;
    zero-padded where the init left the base alone)."""
    from .methods.lora import LoraEmbedding, LoraUnit

    out = dict(tensors)
    for path, host in hosts(model):
        if not isinstance(host, AdapterLayer) or name not in host.adapters:
            continue
        unit = host.adapters[name]
        if not isinstance(unit, LoraUnit):
            continue
        suffixes = ("lora_embedding_A", "lora_embedding_B") if isinstance(unit, LoraEmbedding) else \
            ("lora_A.weight", "lora_B.weight")
        key_a, key_b = (f"{PREFIX}{path}.{s}" for s in suffixes)
        initial = unit.initial_pair()
        a0, b0 = (None, None) if initial is None else (t.detach().cpu() for t in initial)
        if a0 is not None:
            a0, b0 = a0.reshape(out[key_a].shape), b0.reshape(out[key_b].shape)
        out[key_a], out[key_b] = (t.contiguous() for t in lora_init.converted_pair(out[key_a], out[key_b], a0, b0))
    return out


def _write_files(directory: str | os.PathLike, weights: bytes, config_text: bytes) -> None:
    os.makedirs(directory, exist_ok=True)
    write_atomic(os.path.join(directory, WEIGHTS_NAME), weights)
    write_atomic(os.path.join(directory, CONFIG_NAME), config_text)


def _in_place_only(directory: str) -> bool:
    """True for a directory that cannot be replaced by a rename: a mount point, or the
    working directory or one above it (the process would be left in the removed one)."""
    if not os.path.isdir(directory):
        return False
    real = os.path.realpath(directory)
    cwd = os.path.realpath(os.getcwd())
    return os.path.ismount(real) or cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)


def read_config(directory: str | os.PathLike):
    """Read and validate ``adapter_config.json`` of an adapter directory."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isdir(directory):
        raise AdapterFileError(f"{directory}: adapter directory not found")
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: not found (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AdapterFileError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise AdapterFileError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
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
        except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:  # a damaged file
            raise AdapterFileError(f"{path}: unreadable safetensors file: {exc}") from None
    pickle_path = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(pickle_path):
        if not allow_pickle:
            raise AdapterFileError(pickle_refusal(pickle_path))
        return read_pickled_tensors(pickle_path)
    raise AdapterFileError(f"{directory}: no {WEIGHTS_NAME} (nor {PICKLE_NAME})")


def pickle_refusal(path: str | os.PathLike) -> str:
    """Why a pickle adapter file is not read without opting in, and how to opt in."""
    return (f"{path}: a pickle file, which can run code when it is read, so peftkit does not read it by default "
            f"(it reads {WEIGHTS_NAME}); if you trust the file, pass allow_pickle=True (--allow-pickle on the "
            "command line) to read it with torch.load(weights_only=True), which accepts tensors only")


def read_pickled_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A pickle of ``{name: tensor}`` read with ``torch.load(weights_only=True)``: anything else
    in it (an object that would run code when unpickled, say) is refused, not run."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AdapterFileError(f"{path}: holds something other than tensors, so torch.load(weights_only=True) "
                               f"refused it ({_unpickling_reason(exc)}); it was not loaded") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise AdapterFileError(f"{path}: unreadable: {_first_line(exc)}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        found = type(data).__name__ if not isinstance(data, dict) else "a dict with other values than tensors"
        raise AdapterFileError(f"{path}: holds something other than tensors (expected a dict of tensors, "
                               f"found {found})")
    return data


def _unpickling_reason(exc: BaseException) -> str:
    """torch's few-paragraph refusal cut to the line that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line:  # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
            line = line.split("error: ", 1)[-1]  # "WeightsUnpickler error: Unsupported global: GLOBAL exec ..."
            return line.split(". ", 1)[0].rstrip(".")  # not the advice on allowlisting it that follows
    return lines[-1].rstrip(".") if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load(model: nn.Module, directory: str | os.PathLike, name: str = "default", trainable: bool = False,
         allow_pickle: bool = False) -> nn.Module:
    """Load an adapter saved by peftkit or HF PEFT into ``model`` under ``name``.

    The adapter becomes the active one; its parameters train only with ``trainable=True``.
    """
    check_adapter_name(name)
    if has_adapters(model) and name in get_state(model).configs:
        raise ConfigError(f"an adapter named {name!r} exists already; delete it or choose another name")
    config = read_config(directory)
    tensors = read_tensors(directory, allow_pickle)
    # A file holds what inference uses (HF PEFT's inference_mode): for P-tuning and projected
    # prefixes that is the prompt itself, so the adapter is built without its training encoder.
    config.inference_mode = True
    before_active = get_state(model).active if has_adapters(model) else []
    before_grad = [(p, p.requires_grad) for p in model.parameters()]

    def undo() -> None:
        ops.delete(model, name)
        if before_active:
            ops.set_active(model, before_active)
        for p, flag in before_grad:
            p.requires_grad_(flag)

    init = getattr(config, "init_lora_weights", None) if config.peft_type == "LORA" else None
    if init is not None and lora_init.modifies_base(init):
        # The init writes into the base weights (PiSSA, OLoRA, LoftQ): the file's keys and shapes
        # are checked against a build without it first, so a refused file leaves the base as it was.
        with lora_init.building_structure_only():
            _build(model, copy.deepcopy(config), name, directory)
        try:
            _fill(model, name, tensors, os.fspath(directory), check_only=True)
        finally:
            undo()
        if not lora_init.reloads_exactly(init):
            warnings.warn(f"{os.path.join(os.fspath(directory), CONFIG_NAME)}: init_lora_weights={init!r} "
                          "(a randomized SVD) was saved unconverted: running it again on this base gives another "
                          "residual, so the adapter does not compute what was trained; save such an adapter with "
                          "plain_lora=True (peftkit.save's default for it)", PeftkitWarning, stacklevel=2)
    _build(model, config, name, directory)
    try:
        _fill(model, name, tensors, os.fspath(directory))
    except BaseException:  # leave the model exactly as it was
        undo()
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
        elif name in host.names() and isinstance(host, SavedModule):
            for key in host.file_tensors(name, path):
                param = key[len(PREFIX) + len(path) + 1:]
                out[f"{PREFIX}{path}.modules_to_save.{param}"] = None
                out[f"{PREFIX}{path}.original_module.{param}"] = None
    out.update(tokens.optional_tensors(model, name))  # a resized vocabulary's embedding layers
    return out


def _build(model: nn.Module, config, name: str, directory: str | os.PathLike) -> None:
    try:  # the file's config is the truth: no task type or head is inferred from the model
        build(model, config, name, infer_defaults=False)
    except ConfigError as exc:  # the file asks for something this model does not have
        raise AdapterFileError(f"{os.path.join(os.fspath(directory), CONFIG_NAME)}: {exc}") from None


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str,
          check_only: bool = False) -> None:
    """Check the file's keys and shapes against adapter ``name`` and copy the tensors in (with
    ``check_only``, only check)."""
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
    if check_only:
        return
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
