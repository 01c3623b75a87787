"""LayerNorm tuning (``LN_TUNING``) beyond the conformance suite: files exchanged with HF PEFT
both ways, merging, composition with LoRA, several adapters, the host's replacement rule,
errors, and the ``peftkit train --method ln_tuning`` command.

Every adapter is perturbed before it is compared (every trainable parameter moved, as training
would), so a copy or head that is dropped or loaded into the wrong place changes the outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit import architectures, registry
from peftkit.layer import AdapterLayer

from cli_helpers import invoke, save_tiny_bert, write_topic_files
from interop_helpers import assert_same, hf_from_pretrained, perturb_trainable, run
from conftest import model_inputs, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

METHOD = registry.get("LN_TUNING")
LNTuningConfig = METHOD.config_cls
ATOL = 1e-5
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# -- a plain nn.Module with every kind of norm peftkit supports --------------------------------


class MyRMSNorm(nn.Module):
    """A norm of the model's own (matched by its class name, as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.gn = nn.GroupNorm(4, 16)
        self.rms = nn.RMSNorm(16)
        self.mine = MyRMSNorm(16)
        self.plain = nn.LayerNorm(16, elementwise_affine=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(torch.tanh(self.inp(x)))
        h = self.mine(self.rms(self.gn(h)))
        return self.out(self.plain(h))


def norm_net(seed: int = 0) -> NormNet:
    torch.manual_seed(seed)
    return NormNet().eval()


BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "normnet": norm_net}
HF_TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "normnet": None}
NORMNET_TARGETS = ["ln", "gn", "rms", "mine"]


def inputs_for(kind: str) -> dict:
    if kind == "normnet":
        return {"x": torch.randn(4, 8, generator=torch.Generator().manual_seed(5))}
    return model_inputs(kind)


def hf_adapted_names(hf) -> list[str]:
    """The modules HF PEFT wrapped in an LNTuningLayer, under the base model's names."""
    from peft.tuners.ln_tuning.layer import LNTuningLayer

    return sorted(n for n, m in hf.base_model.model.named_modules() if isinstance(m, LNTuningLayer))


# -- the case matrix, shared by both directions ----------------------------------------------


@dataclass
class Case:
    id: str
    kind: str
    kwargs: dict = field(default_factory=dict)


CASES = [
    Case("bert-layernorm", "bert", dict(target_modules=["LayerNorm"])),
    Case("bert-exclude", "bert", dict(target_modules=["LayerNorm"], exclude_modules=["embeddings.LayerNorm"])),
    Case("bert-regex", "bert", dict(target_modules=r".*\.layer\.1\..*LayerNorm")),
    Case("bert-modules-to-save", "bert", dict(target_modules=["output.LayerNorm"], modules_to_save=["pooler.dense"])),
    Case("gpt2-default", "gpt2"),
    Case("gpt2-exclude-regex", "gpt2", dict(exclude_modules=r".*\.h\.0\..*")),
    Case("llama-default", "llama"),
    Case("llama-final-norm", "llama", dict(target_modules=["norm"])),
    Case("normnet", "normnet", dict(target_modules=NORMNET_TARGETS)),
]
IDS = [c.id for c in CASES]


def hf_config(case: Case) -> "peft.LNTuningConfig":
    return peft.LNTuningConfig(task_type=HF_TASK[case.kind], **case.kwargs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hf_adapter_loads_in_peftkit(case: Case, tmp_path) -> None:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    base_out = run(build(), inputs)
    hf = peft.get_peft_model(build(), hf_config(case))
    assert perturb_trainable(hf) > 0
    hf.eval()
    want = run(hf, inputs)
    hf.save_pretrained(tmp_path)

    model = peftkit.load(build(), tmp_path)
    assert peftkit.adapted_modules(model) == hf_adapted_names(hf)
    assert_same(run(model, inputs), want, base_out)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peftkit_adapter_loads_and_merges_in_hf(case: Case, tmp_path) -> None:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    base_out = run(build(), inputs)
    model = peftkit.apply(build(), LNTuningConfig(**case.kwargs))
    assert perturb_trainable(model) > 0
    model.eval()
    want = run(model, inputs)
    peftkit.save(model, tmp_path)

    hf = hf_from_pretrained(build(), tmp_path)
    assert hf.peft_config["default"].peft_type == peft.PeftType.LN_TUNING
    assert hf_adapted_names(hf) == peftkit.adapted_modules(model)
    # Every tensor we wrote landed in HF's model unchanged, under the key HF itself would save.
    theirs = peft.get_peft_model_state_dict(hf)
    ours = load_file(tmp_path / WEIGHTS)
    assert sorted(theirs) == sorted(ours)
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key
    assert_same(run(hf, inputs), want, base_out)

    # HF's merge of our file, and ours, give the same function and the same weights.
    merged = hf.merge_and_unload().eval()
    assert_same(run(merged, inputs), want)
    peftkit.unload(model, merge=True)
    assert_same(run(model, inputs), want)
    # HF PEFT's LN tuning unload leaves a modules_to_save wrapper in place (its active copy
    # computes): compare under the names the unwrapped module has.
    hfs = {k.replace(".modules_to_save.default.", "."): v for k, v in merged.state_dict().items()
           if ".original_module." not in k}
    mine = model.state_dict()
    assert sorted(mine) == sorted(hfs)
    for key in mine:
        assert torch.equal(mine[key], hfs[key]), key


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_files_match_hf(case: Case, tmp_path) -> None:
    """The tensor keys, shapes and dtypes, and the config fields, are those HF PEFT writes."""
    build = BUILD[case.kind]
    peftkit.save(peftkit.apply(build(), LNTuningConfig(**case.kwargs)), tmp_path / "pk")
    hf = peft.get_peft_model(build(), hf_config(case))
    hf.save_pretrained(tmp_path / "hf")

    ours, theirs = load_file(tmp_path / "pk" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert {k: (t.shape, t.dtype) for k, t in ours.items()} == {k: (t.shape, t.dtype) for k, t in theirs.items()}
    assert all(".ln_tuning_layers." in k for k in ours if "classifier" not in k and "pooler" not in k)

    mine = json.loads((tmp_path / "pk" / CONFIG).read_text())
    hfs = json.loads((tmp_path / "hf" / CONFIG).read_text())
    assert set(mine) == set(hfs) - {"peft_version", "auto_mapping"}
    for key in ("peft_type", "task_type", "inference_mode", "revision", "exclude_modules"):
        assert mine[key] == hfs[key], key
    # (HF PEFT lists the task's heads a second time when modules_to_save names others.)
    assert set(mine["modules_to_save"] or []) == set(hfs["modules_to_save"] or [])
    assert mine["target_modules"] == hf_adapted_names(hf)  # the exact names adapted
    hf_read = peft.LNTuningConfig.from_pretrained(tmp_path / "pk")
    assert sorted(hf_read.target_modules) == mine["target_modules"]


def test_half_precision_copies_keep_the_base_dtype_like_hf(tmp_path) -> None:
    """HF PEFT does not cast LN tuning's copies (they are the layer itself), nor does peftkit."""
    model = peftkit.apply(tiny_llama().to(torch.bfloat16), LNTuningConfig())
    peftkit.save(model, tmp_path / "pk")
    peft.get_peft_model(tiny_llama().to(torch.bfloat16), peft.LNTuningConfig()).save_pretrained(tmp_path / "hf")
    ours, theirs = load_file(tmp_path / "pk" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert {k: t.dtype for k, t in ours.items()} == {k: t.dtype for k, t in theirs.items()}
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}


def test_layer_filters_are_written_as_exact_names_hf_can_read(tmp_path) -> None:
    """HF PEFT's LNTuningConfig has no layers_to_transform: peftkit applies it and writes the
    modules it adapted, so HF adapts the same ones."""
    inputs = model_inputs("llama")
    model = peftkit.apply(tiny_llama(), LNTuningConfig(layers_to_transform=[1], layers_pattern="layers"))
    assert peftkit.adapted_modules(model) == ["model.layers.1.input_layernorm",
                                              "model.layers.1.post_attention_layernorm"]
    perturb_trainable(model)
    model.eval()
    peftkit.save(model, tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    assert "layers_to_transform" not in data and "layers_pattern" not in data and "init_weights" not in data
    hf = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert hf_adapted_names(hf) == peftkit.adapted_modules(model)
    assert_same(run(hf, inputs), run(model, inputs), run(tiny_llama(), inputs))


# -- default targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_default_targets_are_hf_peft_s(kind) -> None:
    """With no target_modules: the role map's norms; the same modules as HF PEFT's default
    (BERT, which HF PEFT does not map, against its norms named explicitly)."""
    model = peftkit.apply(BUILD[kind](), LNTuningConfig())
    hf = peft.get_peft_model(BUILD[kind](), peft.LNTuningConfig(
        task_type=HF_TASK[kind], target_modules=["LayerNorm"] if kind == "bert" else None))
    assert peftkit.adapted_modules(model) == hf_adapted_names(hf)


# The model types where the role map's norms and HF PEFT's LN tuning defaults differ today
# (reported to the lead; architectures.py is not this method's to change).
DIFFERS_FROM_HF = {"qwen2", "qwen3"}  # peftkit tunes every norm there (architectures.py)


def test_role_map_norms_agree_with_hf_peft_defaults() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as HF

    ours = architectures.table(lambda roles: list(roles.norms) or None)
    assert METHOD.default_targets == ours
    both = sorted((set(ours) & set(HF)) - DIFFERS_FROM_HF)
    assert {"llama", "gpt2", "t5", "mistral", "gemma"} <= set(both)
    for kind in both:
        assert sorted(ours[kind]) == sorted(HF[kind]), kind


# -- merging -----------------------------------------------------------------------------------


def test_merge_copies_the_trained_norm_and_unmerge_restores_the_original() -> None:
    inputs = model_inputs("llama")
    model = peftkit.apply(tiny_llama(), LNTuningConfig(init_weights=False))
    host = model.model.norm
    original = {k: v.clone() for k, v in host.base_layer.state_dict().items()}
    want = run(model, inputs)
    peftkit.merge(model)
    assert torch.equal(host.base_layer.weight, host.adapters["default"].norm.weight)
    assert_same(run(model, inputs), want)
    peftkit.unmerge(model)
    for key, value in host.base_layer.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert_same(run(model, inputs), want)


# -- composition with LoRA ---------------------------------------------------------------------


def test_lora_on_linear_layers_with_ln_tuning_on_norms_equals_a_hand_built_reference() -> None:
    inputs = model_inputs("llama")
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                            init_lora_weights=False), name="lo")
    peftkit.apply(model, LNTuningConfig(init_weights=False), name="ln")
    peftkit.set_active(model, ["lo", "ln"])
    model.eval()
    got = run(model, inputs)

    # The reference: a fresh base whose norms hold the trained copies and whose q/v weights
    # hold W + s·B·A, computed here by hand.
    reference = tiny_llama()
    modules = dict(reference.named_modules())
    wrapped = {"lo": 0, "ln": 0}
    with torch.no_grad():
        for path, host in model.named_modules():
            if not isinstance(host, AdapterLayer):
                continue
            target = modules[path]
            if "ln" in host.adapters:
                target.load_state_dict(host.adapters["ln"].norm.state_dict())
                wrapped["ln"] += 1
            if "lo" in host.adapters:
                unit = host.adapters["lo"]
                target.weight.add_(unit.lora_B @ unit.lora_A * (8 / 4))
                wrapped["lo"] += 1
    assert wrapped == {"lo": 4, "ln": 5}
    assert_same(got, run(reference, inputs), run(tiny_llama(), inputs))
    for name in ("lo", "ln"):  # each alone differs from both together
        peftkit.set_active(model, name)
        assert (run(model, inputs) - got).abs().max() > 1e-3
    peftkit.set_active(model, ["ln", "lo"])
    peftkit.merge(model)
    assert_same(run(model, inputs), got)
    peftkit.unload(model)
    assert_same(run(model, inputs), run(tiny_llama(), inputs))


# -- several adapters --------------------------------------------------------------------------


def _with_copies_of(base: nn.Module, model: nn.Module, name: str) -> nn.Module:
    """``base`` with adapter ``name``'s trained norms copied into its own norms."""
    modules = dict(base.named_modules())
    with torch.no_grad():
        for path, host in model.named_modules():
            if isinstance(host, AdapterLayer) and name in host.adapters:
                modules[path].load_state_dict(host.adapters[name].norm.state_dict())
    return base


def test_two_adapters_switch_and_cannot_be_active_together_on_one_layer(tmp_path) -> None:
    inputs = model_inputs("llama")
    model = tiny_llama()
    peftkit.apply(model, LNTuningConfig(init_weights=False), name="a")
    peftkit.apply(model, LNTuningConfig(target_modules=["norm", "input_layernorm"], init_weights=False), name="b")
    model.eval()
    outs = {}
    for name in ("a", "b"):
        peftkit.set_active(model, name)
        outs[name] = run(model, inputs)
        assert_same(outs[name], run(_with_copies_of(tiny_llama(), model, name), inputs))
    assert (outs["a"] - outs["b"]).abs().max() > 1e-3

    with pytest.raises(peftkit.ModelError, match="cannot be active together on one layer"):
        peftkit.set_active(model, ["a", "b"])
    assert peftkit.active_adapters(model) == ["b"]  # nothing changed
    assert torch.equal(run(model, inputs), outs["b"])

    # Each file computes the same in HF PEFT. (HF PEFT cannot switch between these two in one
    # model: with "b" active, a norm that only "a" adapts raises KeyError in its forward.)
    for name in ("a", "b"):
        peftkit.save(model, tmp_path / name, name=name)
        hf = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / name, adapter_name=name).eval()
        assert_same(run(hf, inputs), outs[name])


def test_two_adapters_on_the_same_norms_switch_like_hf(tmp_path) -> None:
    inputs = model_inputs("gpt2")
    model = tiny_gpt2()
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        peftkit.apply(model, LNTuningConfig(init_weights=False), name=name)
        peftkit.save(model, tmp_path / name, name=name)
    model.eval()
    hf = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "a", adapter_name="a")
    hf.load_adapter(tmp_path / "b", adapter_name="b")
    hf.eval()
    outs = {}
    for name in ("a", "b"):
        peftkit.set_active(model, name)
        hf.set_adapter(name)
        outs[name] = run(model, inputs)
        assert_same(run(hf, inputs), outs[name])
    assert (outs["a"] - outs["b"]).abs().max() > 1e-3


def test_the_base_norm_is_not_called_while_the_copy_replaces_it() -> None:
    inputs = model_inputs("gpt2")
    model = peftkit.apply(tiny_gpt2(), LNTuningConfig(init_weights=False)).eval()
    host = model.transformer.ln_f
    calls = {"base": 0, "copy": 0}
    host.base_layer.register_forward_hook(lambda *_: calls.__setitem__("base", calls["base"] + 1))
    host.adapters["default"].norm.register_forward_hook(lambda *_: calls.__setitem__("copy", calls["copy"] + 1))
    run(model, inputs)
    assert calls == {"base": 0, "copy": 1}
    with peftkit.disabled(model):
        assert torch.equal(run(model, inputs), run(tiny_gpt2(), inputs))
    assert calls == {"base": 1, "copy": 1}
    peftkit.merge(model)  # merged: the base layer (holding the copy's weights) runs alone
    calls.update(base=0, copy=0)  # (merge's probe ran the model before and after)
    run(model, inputs)
    assert calls == {"base": 1, "copy": 0}


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(target_modules=5), "target_modules: expected"),
    (dict(target_modules="all-linear"), "target_modules: expected names or a regex of norm layers"),
    (dict(target_modules="(unclosed"), "target_modules: expected a valid regular expression"),
    (dict(exclude_modules=[1]), "exclude_modules: expected"),
    (dict(modules_to_save="classifier"), "modules_to_save: expected a list of module names"),
    (dict(layers_to_transform=-1), "layers_to_transform: expected"),
    (dict(init_weights="yes"), "init_weights: expected true or false, found 'yes'"),
    (dict(inference_mode=1), "inference_mode: expected true or false"),
    (dict(task_type="CLASSIFY"), "task_type: expected one of"),
])
def test_bad_config_values_name_the_field(kwargs, fragment) -> None:
    with pytest.raises(peftkit.ConfigError, match=fragment.replace("(", r"\(")):
        LNTuningConfig(**kwargs)


def test_config_from_a_file_dict() -> None:
    data = {"peft_type": "LN_TUNING", "target_modules": ["LayerNorm"], "exclude_modules": None,
            "modules_to_save": ["classifier"], "task_type": "SEQ_CLS", "peft_version": "0.21.2",
            "auto_mapping": None, "inference_mode": True, "revision": None, "base_model_name_or_path": None}
    config = registry.config_from_dict(data)
    assert isinstance(config, LNTuningConfig) and config.target_modules == ["LayerNorm"]
    with pytest.raises(peftkit.ConfigError, match="unknown field 'r' = 8 for LN_TUNING"):
        registry.config_from_dict({**data, "r": 8})
    with pytest.raises(peftkit.ConfigError, match="peft_type: expected 'LN_TUNING'"):
        LNTuningConfig.from_dict({**data, "peft_type": "LORA"})


def test_layers_other_than_norms_are_refused_and_nothing_changes() -> None:
    model = tiny_bert()
    keys = list(model.state_dict())
    with pytest.raises(peftkit.ConfigError, match=r"LN tuning cannot adapt 'bert\.encoder\.layer\.0\.attention\."
                                                  r"self\.query' of type Linear; supported: norm layers"):
        peftkit.apply(model, LNTuningConfig(target_modules=["LayerNorm", "query"]))
    assert list(model.state_dict()) == keys and not any(isinstance(m, AdapterLayer) for m in model.modules())
    with pytest.raises(peftkit.ConfigError, match="of type BertSelfAttention; supported"):
        peftkit.apply(model, LNTuningConfig(target_modules=["attention.self"]))
    with pytest.raises(peftkit.ConfigError, match="'plain' of type LayerNorm: it has no parameters to train"):
        peftkit.apply(norm_net(), LNTuningConfig(target_modules=["plain"]))


def test_an_hf_file_copying_another_layer_is_refused(tmp_path) -> None:
    """HF PEFT copies any module it is pointed at; peftkit refuses such a file, naming the layer."""
    peft.get_peft_model(tiny_bert(), peft.LNTuningConfig(target_modules=["query"])).save_pretrained(tmp_path)
    with pytest.raises(peftkit.AdapterFileError, match=f"{CONFIG}.*'bert.encoder.layer.0.attention.self.query' "
                                                       "of type Linear"):
        peftkit.load(tiny_bert(), tmp_path)


def test_a_model_without_defaults_asks_for_targets_and_lists_its_norms() -> None:
    with pytest.raises(peftkit.ConfigError, match="no LN tuning default for model type 'NormNet'.*"
                                                  "its norm layers: gn, ln, mine, plain, rms"):
        peftkit.apply(norm_net(), LNTuningConfig())


def test_explicit_targets_on_any_module() -> None:
    inputs = inputs_for("normnet")
    base = run(norm_net(), inputs)
    model = peftkit.apply(norm_net(), LNTuningConfig(target_modules=NORMNET_TARGETS))
    assert peftkit.adapted_modules(model) == sorted(NORMNET_TARGETS)
    assert torch.equal(run(model, inputs), base)  # identity at init
    assert peftkit.trainable_summary(model).trainable == 16 * 2 + 16 * 2 + 16 + 16


# -- the command -------------------------------------------------------------------------------


def test_train_ln_tuning_writes_an_adapter_hf_peft_loads(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tiny = save_tiny_bert(tmp_path / "tiny-bert")
    train, evaluation = write_topic_files(tmp_path)
    out = tmp_path / "run"
    result = invoke("train", "--model", tiny, "--data", train, "--eval-data", evaluation, "--method", "ln_tuning",
                    "--max-steps", 2, "--batch-size", 4, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    adapter = out / "adapter"
    config = json.loads((adapter / CONFIG).read_text())
    assert config["peft_type"] == "LN_TUNING" and "classifier" in config["modules_to_save"]
    options = json.loads((adapter / "train_args.json").read_text())["options"]
    assert options["lr"] == registry.cli_methods()["ln_tuning"][1].defaults["lr"] == 1e-2

    def base():
        return AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=3,
                                                                  ignore_mismatched_sizes=True).eval()

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    inputs = dict(tokenizer(["the cat plays piano", "interest on savings"], padding=True, return_tensors="pt"))
    hf = peft.PeftModel.from_pretrained(base(), adapter).eval()
    ours = peftkit.load(base(), adapter).eval()
    assert hf_adapted_names(hf) == peftkit.adapted_modules(ours) == config["target_modules"]
    assert_same(run(hf, inputs), run(ours, inputs))
    # The copies trained (they are no longer the base's norms).
    tensors = load_file(adapter / WEIGHTS)
    norm = dict(base().named_parameters())
    assert any(not torch.equal(t, norm[k[len("base_model.model."):].replace(".ln_tuning_layers", "")])
               for k, t in tensors.items() if ".ln_tuning_layers." in k)
