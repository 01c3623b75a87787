"""Property-based tests: config parsing, target matching and the adapter file loader, fed random
and damaged input, raise nothing but ``PeftkitError`` subclasses (a bare ``KeyError``,
``TypeError``, ``re.error`` or a safetensors error escaping is a bug), and a load that fails
leaves the model as it was.

Deterministic (``derandomize=True``, no example database) so CI sees the same examples on every
run; the counts are modest so the file runs in seconds.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import peftkit
from conftest import tiny_bert
from peftkit import PeftkitError
from peftkit.io import read_config, read_tensors
from peftkit.registry import all_methods, config_from_dict, method_for
from peftkit.state import has_adapters
from peftkit.targeting import find_targets

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=10)


def _field_names() -> list[str]:
    import dataclasses

    names = {"peft_type"}
    for method in all_methods():
        names |= {f.name for f in dataclasses.fields(method.config_cls)}
        names |= set(method.config_cls.unsupported_defaults) | set(method.config_cls.ignored_fields)
    return sorted(names)


FIELD_NAMES = _field_names()
PEFT_TYPES = sorted(m.peft_type for m in all_methods())
KEYS = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=10))
VALUES = st.one_of(JSON_VALUES, st.sampled_from(PEFT_TYPES))


def _valid_dicts() -> list[dict]:
    """One valid file-like dict per registered method (peftkit's own ``to_dict``, which carries
    HF PEFT's unsupported fields at their defaults too), plus LoRA ones with the selectors set."""
    out = [m.config_cls().to_dict() for m in all_methods()]
    out.append(peftkit.LoraConfig(r=4, target_modules=["query", "value"], layers_to_transform=[0],
                                  layers_pattern="layer", rank_pattern={"query": 2}, alpha_pattern={"value": 3},
                                  modules_to_save=["classifier"], task_type="SEQ_CLS").to_dict())
    try:  # and what HF PEFT itself writes
        import peft

        out += [peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS").to_dict(),
                peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
                               ).to_dict(),
                peft.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS").to_dict(),
                peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=8).to_dict(),
                peft.PrefixTuningConfig(num_virtual_tokens=4).to_dict()]
    except ImportError:  # pragma: no cover - peft is in the test extra
        pass
    return [json.loads(json.dumps(d, default=sorted)) for d in out]


VALID = _valid_dicts()


def _quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown empty fields are warnings, by design
        return fn(*args, **kwargs)


# -- config parsing -----------------------------------------------------------------------


@settings(max_examples=400, **SETTINGS)
@given(st.one_of(JSON_VALUES, st.dictionaries(KEYS, VALUES, max_size=8),
                 st.builds(lambda t, d: {"peft_type": t, **d}, st.sampled_from(PEFT_TYPES),
                           st.dictionaries(KEYS, VALUES, max_size=6))))
def test_config_from_random_values_raises_only_peftkit_errors(data):
    try:
        config = _quietly(config_from_dict, data, source="random.json")
    except PeftkitError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    assert isinstance(config, peftkit.PeftConfig)
    # What was accepted is a config peftkit can write and read back.
    assert _quietly(config_from_dict, json.loads(json.dumps(config.to_dict(), default=str))) is not None


@st.composite
def mutated_configs(draw) -> dict:
    data = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "drop", "add"]))
        keys = sorted(data)
        if action == "drop" and keys:
            data.pop(draw(st.sampled_from(keys)))
        elif action == "set" and keys:
            data[draw(st.sampled_from(keys))] = draw(VALUES)
        else:
            data[draw(KEYS)] = draw(VALUES)
    return data


@settings(max_examples=400, **SETTINGS)
@given(mutated_configs())
def test_mutated_valid_configs_raise_only_peftkit_errors(data):
    try:
        config = _quietly(config_from_dict, data, source="mutated.json")
    except PeftkitError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    assert config.peft_type == str(data["peft_type"]).upper()


# -- target matching ----------------------------------------------------------------------

with torch.random.fork_rng():  # built at import: leave the global generator as it was
    MODEL = tiny_bert()
NAMES = [name for name, _ in MODEL.named_modules() if name]
PARTS = sorted({part for name in NAMES for part in name.split(".")})
PIECES = st.one_of(st.sampled_from(PARTS + NAMES[:6]), st.text(alphabet="abqkvyer.0123_*+?()[]{}|^$\\-", max_size=8))
SELECTORS = st.one_of(
    st.none(), st.just("all-linear"),
    st.builds("".join, st.lists(PIECES, min_size=1, max_size=3)),  # a string: a full-match regex
    st.lists(PIECES, max_size=4),
    JSON_SCALARS,
)


@settings(max_examples=300, **SETTINGS)
@given(target_modules=SELECTORS, exclude_modules=st.one_of(st.none(), SELECTORS),
       layers=st.one_of(st.none(), st.integers(-1, 3), st.lists(st.integers(-1, 3), max_size=3), JSON_SCALARS),
       layers_pattern=st.one_of(st.none(), PIECES, st.lists(PIECES, max_size=2)))
def test_target_matching_raises_only_peftkit_errors(target_modules, exclude_modules, layers, layers_pattern):
    lora = method_for(peftkit.LoraConfig())
    try:
        config = peftkit.LoraConfig(target_modules=target_modules, exclude_modules=exclude_modules,
                                    layers_to_transform=layers, layers_pattern=layers_pattern)
        found = find_targets(MODEL, config, lora.default_targets)
    except PeftkitError:
        event("refused")
        return
    event("matched")
    assert found and all(name in NAMES for name, _ in found)


@settings(max_examples=60, **SETTINGS)
@given(target_modules=SELECTORS)
def test_apply_with_random_targets_changes_nothing_when_refused(target_modules):
    model = copy.deepcopy(MODEL)
    before = [name for name, _ in model.named_modules()]
    try:
        peftkit.apply(model, peftkit.LoraConfig(r=2, target_modules=target_modules))
    except PeftkitError:
        assert [name for name, _ in model.named_modules()] == before
        return
    peftkit.unload(model)
    assert [name for name, _ in model.named_modules()] == before


# -- the file loader ----------------------------------------------------------------------


def _saved_adapter() -> dict[str, bytes]:
    model = copy.deepcopy(MODEL)
    peftkit.apply(model, peftkit.LoraConfig(r=2, target_modules=["query", "value"]))
    with tempfile.TemporaryDirectory() as d:
        peftkit.save(model, d)
        return {name: open(os.path.join(d, name), "rb").read() for name in os.listdir(d)}


FILES = _saved_adapter()
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _snapshot(model) -> tuple:
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()], has_adapters(model))


def _same(a: tuple, b: tuple) -> bool:
    return (a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
            and a[2] == b[2] and a[3] == b[3])


def _load_damaged(name: str, data: bytes) -> None:
    """Write the adapter with file ``name`` replaced by ``data``; the readers and ``load`` raise
    only ``PeftkitError``, and a failed load leaves a fresh model exactly as it was."""
    with tempfile.TemporaryDirectory() as d:
        for file, content in FILES.items():
            with open(os.path.join(d, file), "wb") as f:
                f.write(data if file == name else content)
        for reader in (read_config, read_tensors):
            try:
                _quietly(reader, d)
            except PeftkitError:
                pass
        model = copy.deepcopy(MODEL)
        before = _snapshot(model)
        try:
            _quietly(peftkit.load, model, d)
        except PeftkitError as exc:
            event(f"refused: {type(exc).__name__}")
            assert _same(before, _snapshot(model)), "a failed load changed the model"
        else:
            event("loaded")


@settings(max_examples=80, **SETTINGS)
@given(st.sampled_from([WEIGHTS, CONFIG]), st.binary(max_size=300))
def test_loader_on_random_bytes(name, data):
    _load_damaged(name, data)


@settings(max_examples=80, **SETTINGS)
@given(st.sampled_from([WEIGHTS, CONFIG]), st.floats(0, 1, exclude_max=True))
def test_loader_on_truncated_files(name, fraction):
    _load_damaged(name, FILES[name][: int(len(FILES[name]) * fraction)])


@settings(max_examples=150, **SETTINGS)
@given(st.sampled_from([WEIGHTS, CONFIG]), st.lists(st.integers(0, 10**9), min_size=1, max_size=3),
       st.booleans())
def test_loader_on_bit_flipped_files(name, flips, in_header):
    data = FILES[name]
    if name == WEIGHTS and in_header:  # the JSON header: 8 bytes of length, then the header
        header = 8 + int.from_bytes(data[:8], "little")
        flips = [f % (header * 8) for f in flips]
    positions = [f // 8 % len(data) * 8 + f % 8 for f in flips]
    out = bytearray(data)
    for p in positions:
        out[p // 8] ^= 1 << (p % 8)
    _load_damaged(name, bytes(out))
