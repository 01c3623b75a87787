"""Interoperability with Hugging Face PEFT, both ways.

- HF -> peftkit: what ``PeftModel.save_pretrained`` writes loads with ``peftkit.load`` into a
  fresh copy of the base, and the two models compute the same outputs.
- peftkit -> HF: what ``peftkit.save`` writes loads with ``PeftModel.from_pretrained``, and
  the outputs agree, unmerged and after HF's ``merge_and_unload``.
- The files themselves: config fields, tensor keys in HF's naming, shapes and dtypes, checked
  against the file HF writes for the same adapter on the same base.

Every adapter starts from ``init_lora_weights=False`` (B is not zero); in the case matrix every trainable
parameter is then perturbed, as a few training steps would, so that a layer, head copy or bias
that is silently dropped or loaded into the wrong place changes the outputs.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from interop_helpers import assert_same, perturb_trainable, run
from conftest import minilm, model_inputs, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = "adapter_model.safetensors"


# -- small non-transformers models (HF PEFT adapts these with task_type=None) ---------------


class TinyConvNet(nn.Module):
    """Conv2d -> Linear -> head, on (B, 3, 8, 8) images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)  # (B, 6, 4, 4)
        self.fc = nn.Linear(6 * 4 * 4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)  # (B, 96)
        return self.head(torch.relu(self.fc(h)))  # (B, 3)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(torch.tanh(self.fc(x)))


class TinyBlocks(nn.Module):
    """A top-level ``blocks`` ModuleList, as in many vision and custom models."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(3))
        self.out = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class Expert(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MoeLayer(nn.Module):
    def __init__(self, dim: int, n_experts: int = 2) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Expert(dim) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + sum(torch.tanh(e(x)) for e in self.experts)


class MoeBody(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MoeLayer(dim) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TinyMoe(nn.Module):
    """Numbered modules inside numbered layers: ``body.layers.<i>.experts.<j>.fc``."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.body = MoeBody(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def tiny_blocks(seed: int = 0) -> TinyBlocks:
    torch.manual_seed(seed)
    return TinyBlocks().eval()


def tiny_moe(seed: int = 0) -> TinyMoe:
    torch.manual_seed(seed)
    return TinyMoe().eval()


BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "minilm": minilm,
         "convnet": tiny_convnet, "blocks": tiny_blocks, "moe": tiny_moe}
HF_TASK = {"bert": "SEQ_CLS", "minilm": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM",
           "convnet": None, "blocks": None, "moe": None}


def inputs_for(kind: str) -> dict:
    g = torch.Generator().manual_seed(5)
    if kind == "convnet":
        return {"x": torch.randn(2, 3, 8, 8, generator=g)}
    if kind in ("blocks", "moe"):
        return {"x": torch.randn(2, 5, 16, generator=g)}
    return model_inputs(kind)


def perturb_named(model: nn.Module, needle: str, seed: int = 4, scale: float = 0.2) -> int:
    g = torch.Generator().manual_seed(seed)
    moved = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if needle in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
                moved += 1
    return moved


def hf_lora(kind: str, **kwargs) -> "peft.LoraConfig":
    kwargs.setdefault("init_lora_weights", False)
    return peft.LoraConfig(task_type=HF_TASK[kind], **kwargs)


def pk_lora(**kwargs) -> peftkit.LoraConfig:
    kwargs.setdefault("init_lora_weights", False)
    return peftkit.LoraConfig(**kwargs)


# -- the case matrix, shared by both directions ----------------------------------------------


@dataclass
class Case:
    id: str
    kind: str
    kwargs: dict = field(default_factory=dict)
    # Merging into an embedding tied to the LM head also changes the head (in HF PEFT too),
    # so merged outputs equal the unmerged ones only for untied targets.
    tied: bool = False


CASES = [
    Case("bert-names", "bert", dict(target_modules=["query", "value"], r=4, lora_alpha=8)),
    Case("bert-dotted-suffixes", "bert", dict(target_modules=["attention.self.key", "output.dense"])),
    Case("bert-regex", "bert", dict(target_modules=r".*\.layer\.1\.attention\.self\.(query|key)")),
    Case("bert-all-linear", "bert", dict(target_modules="all-linear", r=2)),
    Case("bert-layers-pattern", "bert",
         dict(target_modules=["query", "value", "dense"], layers_to_transform=[1], layers_pattern="layer")),
    Case("bert-rank-alpha-pattern", "bert",
         dict(target_modules=["query", "key", "value"], r=4, lora_alpha=8,
              rank_pattern={"query": 2, "layer.1.attention.self.value": 6}, alpha_pattern={"key": 24})),
    # Pattern keys are regexes; an alternation covers both names (HF: ``(.*\.)?(key)$``).
    Case("bert-pattern-alternation", "bert",
         dict(target_modules=["query", "key", "value"], rank_pattern={"query|key": 2}, alpha_pattern={"key|value": 3})),
    Case("bert-exclude-list", "bert",
         dict(target_modules=["query", "key", "dense"], exclude_modules=["layer.0.attention.self.key", "pooler.dense"])),
    Case("bert-exclude-regex", "bert", dict(target_modules="all-linear", exclude_modules=r".*intermediate.*")),
    Case("bert-modules-to-save", "bert", dict(target_modules=["query"], modules_to_save=["pooler.dense"])),
    Case("bert-bias-all", "bert", dict(target_modules=["query", "value"], bias="all")),
    Case("bert-bias-lora-only", "bert", dict(target_modules=["query", "value"], bias="lora_only")),
    Case("bert-embedding", "bert", dict(target_modules=["word_embeddings", "query"], r=4, lora_alpha=16)),
    Case("gpt2-conv1d", "gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    Case("gpt2-dropout-eval", "gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.3)),
    Case("gpt2-bias-all", "gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="all")),
    Case("gpt2-embedding", "gpt2", dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True), tied=True),
    Case("llama-all-proj", "llama",
         dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    Case("llama-all-linear", "llama", dict(target_modules="all-linear", r=2, lora_alpha=4)),
    Case("llama-layers-no-pattern", "llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0)),
    Case("llama-rslora", "llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, use_rslora=True)),
    Case("llama-modules-to-save", "llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    Case("llama-embedding", "llama", dict(target_modules=["embed_tokens", "q_proj"])),
    Case("bert-dora", "bert", dict(target_modules=["query", "value"], use_dora=True)),
    Case("gpt2-dora", "gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
    Case("llama-dora-dropout", "llama", dict(target_modules=["q_proj", "down_proj"], use_dora=True, lora_dropout=0.2)),
    Case("minilm", "minilm", dict(target_modules=["query", "value"], r=4, lora_alpha=8)),
    Case("convnet-conv2d", "convnet", dict(target_modules=["conv", "fc"], modules_to_save=["head"])),
    Case("blocks-layers-pattern", "blocks",
         dict(target_modules=["fc", "proj"], layers_to_transform=[1, 2], layers_pattern="blocks")),
    # The layer index is the first number in the name (HF PEFT), not an expert's index after it.
    Case("moe-layers-no-pattern", "moe", dict(target_modules=["fc"], layers_to_transform=[1])),
    Case("moe-layers-pattern", "moe", dict(target_modules=["fc"], layers_to_transform=[0], layers_pattern="layers")),
]
CASE_IDS = [c.id for c in CASES]
# Merging is checked on one case per layer type and per option that changes the merged weights
# (MiniLM, 22M parameters, takes part in each direction once, not here).
MERGE_IDS = ["bert-names", "bert-all-linear", "bert-rank-alpha-pattern", "bert-pattern-alternation",
             "bert-modules-to-save", "bert-bias-all", "bert-embedding", "gpt2-conv1d", "gpt2-embedding",
             "bert-dora", "gpt2-dora", "llama-rslora", "llama-modules-to-save", "convnet-conv2d", "blocks-layers-pattern"]
MERGE_CASES = [c for c in CASES if c.id in MERGE_IDS]
assert len(MERGE_CASES) == len(MERGE_IDS)


# -- HF -> peftkit -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hf_adapter_loads_in_peftkit(case: Case, tmp_path) -> None:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    base_out = run(build(), inputs)

    hf = peft.get_peft_model(build(), hf_lora(case.kind, **case.kwargs))
    assert perturb_trainable(hf) > 0
    hf.eval()
    want = run(hf, inputs)
    hf.save_pretrained(tmp_path)

    model = build()
    peftkit.load(model, tmp_path)
    assert not model.training
    assert_same(run(model, inputs), want, base_out)


def test_hf_dropout_follows_train_and_eval(tmp_path) -> None:
    """lora_dropout > 0 from an HF file: train mode drops, eval mode is deterministic and equal."""
    kwargs = dict(target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.5)
    hf = peft.get_peft_model(tiny_gpt2(), hf_lora("gpt2", **kwargs)).eval()
    hf.save_pretrained(tmp_path)
    model = peftkit.load(tiny_gpt2(), tmp_path)
    inputs = model_inputs("gpt2")
    model.train()
    torch.manual_seed(0)
    first = run(model, inputs)
    second = run(model, inputs)
    assert (first - second).abs().max() > 1e-4
    model.eval()
    assert_same(run(model, inputs), run(hf, inputs), run(tiny_gpt2(), inputs))


def _two_hf_adapters(tmp_path):
    hf = peft.get_peft_model(tiny_bert(), hf_lora("bert", target_modules=["query", "value"]))
    hf.add_adapter("other", hf_lora("bert", target_modules=["key", "dense"], r=2, lora_alpha=6))
    perturb_named(hf, "modules_to_save.default.", seed=1)
    perturb_named(hf, "modules_to_save.other.", seed=2)
    hf.eval()
    hf.save_pretrained(tmp_path)
    return hf


def test_hf_two_adapters_load_under_two_names(tmp_path) -> None:
    inputs = model_inputs("bert")
    hf = _two_hf_adapters(tmp_path)
    # HF writes the default adapter at the top and every other one in a subfolder named after it.
    assert os.path.isfile(tmp_path / WEIGHTS)
    assert os.path.isfile(tmp_path / "other" / WEIGHTS)

    model = tiny_bert()
    peftkit.load(model, tmp_path, name="first")
    peftkit.load(model, tmp_path / "other", name="second")
    assert peftkit.active_adapters(model) == ["second"]

    outs = {}
    for hf_name, pk_name in (("default", "first"), ("other", "second")):
        hf.set_adapter(hf_name)
        peftkit.set_active(model, pk_name)
        outs[pk_name] = run(model, inputs)
        assert_same(outs[pk_name], run(hf, inputs))
    assert (outs["first"] - outs["second"]).abs().max() > 1e-3


def test_hf_two_adapters_active_together(tmp_path) -> None:
    """Two LoRA adapters active at once add their terms, in HF PEFT and in peftkit."""
    inputs = model_inputs("llama")
    hf = peft.get_peft_model(tiny_llama(), hf_lora("llama", target_modules=["q_proj", "v_proj"]))
    hf.add_adapter("b", hf_lora("llama", target_modules=["v_proj", "down_proj"], r=2))
    hf.save_pretrained(tmp_path)
    hf.base_model.set_adapter(["default", "b"])
    hf.eval()

    model = tiny_llama()
    peftkit.load(model, tmp_path, name="a")
    peftkit.load(model, tmp_path / "b", name="b")
    peftkit.set_active(model, ["a", "b"])
    both = run(model, inputs)
    assert_same(both, run(hf, inputs))
    peftkit.set_active(model, "a")
    assert (run(model, inputs) - both).abs().max() > 1e-3


def test_hf_pickle_file_loads_with_opt_in(tmp_path) -> None:
    inputs = model_inputs("llama")
    hf = peft.get_peft_model(tiny_llama(), hf_lora("llama", target_modules=["q_proj", "v_proj"])).eval()
    hf.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "adapter_model.bin")
    assert not os.path.exists(tmp_path / WEIGHTS)
    model = peftkit.load(tiny_llama(), tmp_path, allow_pickle=True)
    assert_same(run(model, inputs), run(hf, inputs), run(tiny_llama(), inputs))


# -- peftkit -> HF -----------------------------------------------------------------------------


def _peftkit_adapted(case: Case, directory) -> tuple[nn.Module, torch.Tensor]:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    model = peftkit.apply(build(), pk_lora(**case.kwargs))
    assert perturb_trainable(model) > 0
    model.eval()
    peftkit.save(model, directory)
    return model, run(model, inputs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peftkit_adapter_loads_in_hf(case: Case, tmp_path) -> None:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    base_out = run(build(), inputs)
    _, want = _peftkit_adapted(case, tmp_path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    assert not [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert hf.peft_config["default"].peft_type == peft.PeftType.LORA
    # Every tensor we wrote landed in HF's model unchanged, under the key HF itself would save.
    theirs = peft.get_peft_model_state_dict(hf)
    for key, tensor in load_file(tmp_path / WEIGHTS).items():
        assert key in theirs, key
        assert torch.equal(theirs[key], tensor), key
    assert_same(run(hf, inputs), want, base_out)


@pytest.mark.parametrize("case", MERGE_CASES, ids=MERGE_IDS)
def test_peftkit_adapter_merged_in_hf(case: Case, tmp_path) -> None:
    """HF's merge_and_unload of a peftkit file gives peftkit's outputs, and peftkit's merge
    gives the same base weights as HF's."""
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    model, want = _peftkit_adapted(case, tmp_path)

    merged = peft.PeftModel.from_pretrained(build(), tmp_path).merge_and_unload().eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    if not case.tied:
        assert_same(run(merged, inputs), want)

    peftkit.unload(model, merge=True)
    assert_same(run(model, inputs), run(merged, inputs))
    ours, theirs = model.state_dict(), merged.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key


def test_peftkit_two_adapters_load_in_hf(tmp_path) -> None:
    inputs = model_inputs("bert")
    model = tiny_bert()
    peftkit.apply(model, pk_lora(target_modules=["query", "value"]), name="a")
    peftkit.apply(model, pk_lora(target_modules=["key", "dense"], r=2, lora_alpha=6), name="b")
    perturb_named(model, ".copies.a.", seed=1)
    perturb_named(model, ".copies.b.", seed=2)
    model.eval()
    peftkit.save(model, tmp_path / "a", name="a")
    peftkit.save(model, tmp_path / "b", name="b")

    hf = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", adapter_name="a")
    hf.load_adapter(tmp_path / "b", adapter_name="b")
    hf.eval()
    outs = {}
    for name in ("a", "b"):
        peftkit.set_active(model, name)
        hf.set_adapter(name)
        outs[name] = run(model, inputs)
        assert_same(run(hf, inputs), outs[name])
    assert (outs["a"] - outs["b"]).abs().max() > 1e-3


def test_peftkit_float64_adapter_loads_in_hf(tmp_path) -> None:
    inputs = model_inputs("llama")
    model = peftkit.apply(tiny_llama().double(), pk_lora(target_modules=["q_proj", "v_proj"]))
    peftkit.save(model, tmp_path)
    assert {t.dtype for t in load_file(tmp_path / WEIGHTS).values()} == {torch.float64}
    hf = peft.PeftModel.from_pretrained(tiny_llama().double(), tmp_path).eval()
    assert_same(run(hf, inputs), run(model, inputs), atol=1e-10)


# -- the files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, task, targets", [
    ("bert", "SEQ_CLS", ["query", "value"]),
    ("gpt2", "CAUSAL_LM", ["c_attn"]),
    ("llama", "CAUSAL_LM", ["q_proj", "v_proj"]),
    ("convnet", None, ["conv"]),
])
def test_config_file_fields(kind, task, targets, tmp_path) -> None:
    model = peftkit.apply(BUILD[kind](), peftkit.LoraConfig(r=4, lora_alpha=12, target_modules=targets))
    peftkit.save(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())

    assert data["peft_type"] == "LORA"
    assert data["task_type"] == task
    assert data["r"] == 4 and data["lora_alpha"] == 12
    expected = sorted(n for n, _ in BUILD[kind]().named_modules() if n.split(".")[-1] in targets)
    assert expected and data["target_modules"] == expected
    if task == "SEQ_CLS":
        assert "classifier" in data["modules_to_save"]
    # HF PEFT reads the same file into its own config class with the same values.
    hf_config = peft.LoraConfig.from_pretrained(tmp_path)
    assert (hf_config.r, hf_config.lora_alpha, hf_config.task_type) == (4, 12, task)
    assert sorted(hf_config.target_modules) == expected


@pytest.mark.parametrize("kind, targets, extra", [
    ("bert", ["query", "word_embeddings"], {}),
    ("gpt2", ["c_attn", "wte"], {"fan_in_fan_out": True}),
    ("llama", ["q_proj", "down_proj"], {"rank_pattern": {"down_proj": 2}}),
    ("convnet", ["conv", "fc"], {"modules_to_save": ["head"]}),
])
def test_tensor_keys_and_shapes_match_hf(kind, targets, extra, tmp_path) -> None:
    build = BUILD[kind]
    model = peftkit.apply(build(), pk_lora(target_modules=targets, **extra))
    peftkit.save(model, tmp_path / "pk")
    hf = peft.get_peft_model(build(), hf_lora(kind, target_modules=targets, **extra))
    hf.save_pretrained(tmp_path / "hf")

    ours = load_file(tmp_path / "pk" / WEIGHTS)
    theirs = load_file(tmp_path / "hf" / WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].dtype == theirs[key].dtype, key


def test_tensor_key_names(tmp_path) -> None:
    model = peftkit.apply(tiny_bert(), pk_lora(target_modules=["query", "word_embeddings"], r=4))
    peftkit.save(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    query = "base_model.model.bert.encoder.layer.0.attention.self.query"
    emb = "base_model.model.bert.embeddings.word_embeddings"
    assert tensors[f"{query}.lora_A.weight"].shape == (4, 32)
    assert tensors[f"{query}.lora_B.weight"].shape == (32, 4)
    assert tensors[f"{emb}.lora_embedding_A"].shape == (4, 120)
    assert tensors[f"{emb}.lora_embedding_B"].shape == (32, 4)
    assert tensors["base_model.model.classifier.weight"].shape == (2, 32)
    assert "base_model.model.classifier.bias" in tensors
    assert all(k.startswith("base_model.model.") for k in tensors)
    assert not any(".default" in k or ".adapters." in k or ".copies." in k for k in tensors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes_preserved_like_hf(dtype, tmp_path) -> None:
    """Tensors keep their dtype in the file; half-precision bases get float32 LoRA weights,
    as HF PEFT's default ``autocast_adapter_dtype`` does, and the head copy keeps the base's."""
    model = peftkit.apply(tiny_bert().to(dtype), pk_lora(target_modules=["query", "word_embeddings"]))
    peftkit.save(model, tmp_path / "pk")
    hf = peft.get_peft_model(tiny_bert().to(dtype), hf_lora("bert", target_modules=["query", "word_embeddings"]))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_file(tmp_path / "pk" / WEIGHTS)
    theirs = load_file(tmp_path / "hf" / WEIGHTS)
    assert {k: t.dtype for k, t in ours.items()} == {k: t.dtype for k, t in theirs.items()}
    assert ours["base_model.model.classifier.weight"].dtype == dtype
    lora_dtype = dtype if dtype == torch.float64 else torch.float32
    assert {t.dtype for k, t in ours.items() if "lora_" in k} == {lora_dtype}


# -- the file is the truth: nothing it states is re-inferred from the model when loading -------


def _hf_null_task_adapter(tmp_path, **extra):
    """An HF PEFT LoRA file with ``task_type: null`` over a sequence classifier: HF PEFT keeps the
    base's own head (it is not in modules_to_save)."""
    base = tiny_bert()
    hf = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False,
                                                   **extra))
    hf.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["task_type"] is None
    return peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()


def test_hf_file_with_null_task_type_loads_into_a_classifier(tmp_path) -> None:
    theirs = _hf_null_task_adapter(tmp_path)
    ours = peftkit.load(tiny_bert(), tmp_path)
    inputs = model_inputs("bert")
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=0, atol=ATOL)
    config = peftkit.state.get_state(ours).configs["default"]
    assert config.task_type is None and not config.modules_to_save  # as the file says: no head added
    out = tmp_path / "again"
    peftkit.save(ours, out)  # written back as it was read
    with open(out / "adapter_config.json") as f:
        data = json.load(f)
    assert data["task_type"] is None and not data["modules_to_save"]
    assert set(load_file(out / WEIGHTS)) == set(load_file(tmp_path / WEIGHTS))


def test_hf_file_naming_its_own_modules_to_save_loads_only_those(tmp_path) -> None:
    base = tiny_bert()
    hf = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query"], init_lora_weights=False,
                                                   modules_to_save=["pooler.dense"]))
    with torch.no_grad():
        hf.base_model.model.bert.pooler.dense.modules_to_save["default"].weight.add_(0.5)
    hf.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    ours = peftkit.load(tiny_bert(), tmp_path)
    assert peftkit.state.get_state(ours).configs["default"].modules_to_save == ["pooler.dense"]
    inputs = model_inputs("bert")
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=0, atol=ATOL)


def test_prompt_file_with_null_task_type_is_refused_naming_the_file(tmp_path) -> None:
    hf = peft.get_peft_model(tiny_bert(), peft.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    hf.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["task_type"] = None
    path.write_text(json.dumps(data))
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.AdapterFileError, match=r"adapter_config.json: task_type None"):
        peftkit.load(model, tmp_path)
    assert not peftkit.state.has_adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
