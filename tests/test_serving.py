"""Mixed-adapter batches (``adapter_names=``): every row equals that row run with its own adapter,
in forward and generate, on both low-rank paths; what cannot run is a ConfigError; compiled
models neither break graphs nor recompile when states repeat."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftkit
from conftest import model_inputs, tiny_bert, tiny_gpt2, tiny_llama
from peftkit import serving
from prompt_models import peftkit_config, tiny_llama_cls

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = "__base__"
PATHS = [None, "grouped", "per_row"]


@pytest.fixture
def path(request):
    serving.FORCE_PATH = request.param
    yield request.param
    serving.FORCE_PATH = None


def all_linear(kind: str):
    return ["query", "key", "value", "dense"] if kind == "bert" else "all-linear"


def weight_adapters(model, kind: str):
    """Four LoRA-family adapters of different ranks and scalings, DoRA and (IA)³."""
    torch.manual_seed(5)
    peftkit.apply(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=all_linear(kind),
                                            init_lora_weights=False), name="wide")
    peftkit.apply(model, peftkit.LoraConfig(r=2, lora_alpha=3, use_rslora=True, init_lora_weights=False), name="rs")
    peftkit.apply(model, peftkit.LoraConfig(r=3, use_dora=True, init_lora_weights=False), name="dora")
    peftkit.apply(model, peftkit.IA3Config(init_ia3_weights=False), name="ia3")
    return model.eval()


def row_by_row(model, inputs: dict, names: list[str]) -> torch.Tensor:
    """The reference: each row alone, with its adapter active (or the adapters disabled)."""
    outs = []
    with torch.no_grad():
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in inputs.items()}
            if name == BASE:
                with peftkit.disabled(model):
                    outs.append(model(**row).logits)
            else:
                peftkit.set_active(model, name)
                outs.append(model(**row).logits)
    return torch.cat(outs)


def mixed(model, inputs: dict, names: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, adapter_names=names).logits


NAMES = ["wide", "rs", BASE, "dora", "wide", "ia3", "rs", "dora", "wide"]


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("kind, build", [("llama", tiny_llama), ("gpt2", tiny_gpt2), ("bert", tiny_bert)])
def test_a_mixed_batch_equals_each_row_with_its_own_adapter(kind, build, path) -> None:
    model = weight_adapters(build(), kind)
    inputs = model_inputs(kind, batch=len(NAMES), length=6)
    inputs["attention_mask"][1, :2] = 0  # padding is per row too
    expected = row_by_row(model, inputs, NAMES)
    torch.testing.assert_close(mixed(model, inputs, NAMES), expected, atol=1e-5, rtol=1e-5)
    assert (expected[0] - expected[2]).abs().max() > 1e-3  # the adapters do change the rows


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_rows_of_one_adapter_in_order_take_the_copy_free_path_and_agree(path) -> None:
    model = weight_adapters(tiny_llama(), "llama")
    names = ["rs", "rs", "wide", "wide"]  # sorted slots, equal groups: no gather, no padding
    inputs = model_inputs("llama", batch=4)
    torch.testing.assert_close(mixed(model, inputs, names), row_by_row(model, inputs, names), atol=1e-5, rtol=1e-5)


def test_adalora_and_vera_rows_mix_with_lora_rows() -> None:
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoraConfig(r=2, init_lora_weights=False), name="lora")
    peftkit.apply(model, peftkit.AdaLoraConfig(init_r=4, target_r=2, total_step=10), name="ada")
    peftkit.apply(model, peftkit.VeraConfig(r=8), name="vera")
    with torch.no_grad():  # non-zero E and λ_b so both change the output
        for p_name, p in model.named_parameters():
            if "lora_E" in p_name or "vera_lambda_b" in p_name:
                p.normal_()
    model.eval()
    names = ["ada", "lora", "vera", BASE, "ada"]
    inputs = model_inputs("llama", batch=5)
    expected = row_by_row(model, inputs, names)
    torch.testing.assert_close(mixed(model, inputs, names), expected, atol=1e-5, rtol=1e-5)
    assert (expected[0] - expected[3]).abs().max() > 1e-3 and (expected[2] - expected[3]).abs().max() > 1e-3


def test_lora_on_embeddings_and_conv2d_layers_mixes() -> None:
    model = tiny_llama()
    for name, r in (("x", 2), ("y", 4)):
        peftkit.apply(model, peftkit.LoraConfig(r=r, target_modules=["embed_tokens", "q_proj"],
                                                init_lora_weights=False), name=name)
    model.eval()
    names = ["y", BASE, "x", "y"]
    inputs = model_inputs("llama", batch=4)
    torch.testing.assert_close(mixed(model, inputs, names), row_by_row(model, inputs, names), atol=1e-5, rtol=1e-5)

    class Convs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
            self.head = nn.Linear(6 * 4 * 4, 5)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    convs = Convs().eval()
    for name, r in (("x", 2), ("y", 3)):
        peftkit.apply(convs, peftkit.LoraConfig(r=r, target_modules=["conv", "head"], init_lora_weights=False),
                      name=name)
    convs.eval()
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        got = convs(images, adapter_names=names)
        expected = []
        for i, name in enumerate(names):
            if name == BASE:
                with peftkit.disabled(convs):
                    expected.append(convs(images[i:i + 1]))
            else:
                peftkit.set_active(convs, name)
                expected.append(convs(images[i:i + 1]))
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_classifier_heads_follow_their_rows() -> None:
    model = tiny_bert(num_labels=3)
    for i, name in enumerate(("p", "q")):
        torch.manual_seed(i)
        peftkit.apply(model, peftkit.LoraConfig(r=2, init_lora_weights=False), name=name)  # each its own head
    model.eval()
    heads = [m for m in model.modules() if isinstance(m, peftkit.layer.SavedModule)]
    assert heads, "the task head is saved per adapter"
    with torch.no_grad():
        for head in heads:
            for copy in head.copies.values():
                for p in copy.parameters():
                    p.normal_()
    names = ["q", "p", BASE, "q"]
    inputs = model_inputs("bert", batch=4)
    torch.testing.assert_close(mixed(model, inputs, names), row_by_row(model, inputs, names), atol=1e-5, rtol=1e-5)


def test_the_same_batch_in_hf_peft_gives_the_same_logits(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    for name, r in (("x", 2), ("y", 4)):
        torch.manual_seed(r)
        peftkit.apply(model, peftkit.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules="all-linear",
                                                init_lora_weights=False), name=name)
        peftkit.save(model, tmp_path / name, name=name)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "x", adapter_name="x")
    theirs.load_adapter(tmp_path / "y", adapter_name="y")
    theirs.eval()
    model.eval()
    names = ["y", "x", BASE, "y", "x"]
    inputs = model_inputs("llama", batch=5)
    with torch.no_grad():
        expected = theirs(**inputs, adapter_names=names).logits
    torch.testing.assert_close(mixed(model, inputs, names), expected, atol=1e-5, rtol=1e-5)


# -- generate -------------------------------------------------------------------------------


def generate_row_by_row(model, inputs: dict, names: list[str], **kwargs) -> torch.Tensor:
    outs = []
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        if name == BASE:
            with peftkit.disabled(model):
                outs.append(model.generate(**row, **kwargs))
        else:
            peftkit.set_active(model, name)
            outs.append(model.generate(**row, **kwargs))
    return torch.cat(outs)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("search", [{}, {"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2},
                                    {"do_sample": True, "num_return_sequences": 2}])
def test_generate_with_adapter_names_equals_each_row_alone(build, search) -> None:
    model = weight_adapters(build(), "llama")
    names = ["dora", BASE, "wide", "ia3"]
    inputs = model_inputs("llama", batch=4, length=5)
    kwargs = {"max_new_tokens": 6, "do_sample": False, **search}
    if search.get("do_sample"):  # sampling: the same draws only row by row, so compare one row per adapter
        names, inputs = names[:1], {k: v[:1] for k, v in inputs.items()}
    torch.manual_seed(0)
    got = model.generate(**inputs, adapter_names=names, **kwargs)
    torch.manual_seed(0)
    expected = generate_row_by_row(model, inputs, names, **kwargs)
    assert torch.equal(got, expected)
    if not search.get("do_sample"):
        assert not torch.equal(got[0], got[1]) or got.shape[0] > len(names)


def test_after_a_mixed_call_the_model_serves_its_active_adapter_again() -> None:
    model = weight_adapters(tiny_llama(), "llama")
    peftkit.set_active(model, "wide")
    inputs = model_inputs("llama", batch=2)
    before = mixed(model, inputs, ["wide", "wide"])
    model(**inputs, adapter_names=["rs", BASE])
    with pytest.raises(IndexError):  # an id beyond the vocabulary fails inside the model: the call's state still goes
        model(input_ids=inputs["input_ids"] + 10_000, adapter_names=["rs", BASE])
    assert all(getattr(m, "_mix", None) is None for m in model.modules())
    peftkit.set_active(model, "wide")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before)
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False, adapter_names=["rs", "ia3"])
    assert tokens.shape == (2, inputs["input_ids"].shape[1] + 3)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before)


def test_changed_adapter_weights_are_seen_by_the_next_mixed_batch() -> None:
    model = weight_adapters(tiny_llama(), "llama")
    names = ["wide", "rs", "dora"]
    inputs = model_inputs("llama", batch=3)
    first = mixed(model, inputs, names)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".wide" in name or ".dora" in name:
                p.mul_(1.5)
    again = mixed(model, inputs, names)
    assert (again - first).abs().max() > 1e-3
    torch.testing.assert_close(again, row_by_row(model, inputs, names), atol=1e-5, rtol=1e-5)


# -- input methods --------------------------------------------------------------------------


@pytest.mark.parametrize("methods", [("prompt", "ptuning"), ("prefix", "prefix_proj")])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_prompt_adapters_of_one_length_mix(methods, build) -> None:
    model = build()
    for i, method in enumerate(methods):
        torch.manual_seed(i)
        peftkit.apply(model, peftkit_config(method, tokens=3), name=method)
    model.eval()
    names = [methods[1], methods[0], methods[1]]
    inputs = model_inputs("llama", batch=3, length=5)
    expected = row_by_row(model, inputs, names)
    torch.testing.assert_close(mixed(model, inputs, names), expected, atol=1e-5, rtol=1e-5)
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(model.generate(**inputs, adapter_names=names, **kwargs),
                       generate_row_by_row(model, inputs, names, **kwargs))


def test_prompt_adapters_mix_in_a_classifier_with_their_heads() -> None:
    model = tiny_llama_cls(num_labels=3)
    for i in range(2):
        torch.manual_seed(i)
        peftkit.apply(model, peftkit_config("prompt", tokens=2), name=f"p{i}")
    model.eval()
    names = ["p1", "p0", "p1"]
    inputs = model_inputs("llama", batch=3, length=5)
    inputs["attention_mask"][0, -2:] = 0  # right padding: the head must still read the last real token
    torch.testing.assert_close(mixed(model, inputs, names), row_by_row(model, inputs, names), atol=1e-5, rtol=1e-5)


# -- what cannot run ------------------------------------------------------------------------


def test_mixes_that_cannot_run_are_errors_that_say_why() -> None:
    model = weight_adapters(tiny_llama(), "llama")
    inputs = model_inputs("llama", batch=2)
    cases = [
        (["wide"], r"1 names for a batch of 2 rows"),
        ("wide", r"must be a list of adapter names"),
        (["wide", "nope"], r"no adapter named 'nope' \(adapters: 'wide', 'rs', 'dora', 'ia3'; '__base__'"),
    ]
    for names, message in cases:
        with pytest.raises(peftkit.ConfigError, match=message):
            model(**inputs, adapter_names=names)
    model.train()
    with pytest.raises(peftkit.ConfigError, match=r"for inference; the model is in training mode"):
        model(**inputs, adapter_names=["wide", "rs"])
    with pytest.raises(peftkit.ConfigError, match=r"training mode"):
        model.generate(**inputs, adapter_names=["wide", "rs"], max_new_tokens=2)
    model.eval()
    with peftkit.disabled(model), pytest.raises(peftkit.ConfigError, match=r"disabled"):
        model(**inputs, adapter_names=["wide", "rs"])
    peftkit.set_active(model, "wide")
    peftkit.merge(model)
    with pytest.raises(peftkit.ConfigError, match=r"merged into .*unmerge"):
        model(**inputs, adapter_names=["wide", "rs"])
    peftkit.unmerge(model)
    peftkit.apply(model, peftkit.LoHaConfig(r=2, init_weights=False), name="loha")
    model.eval()
    with pytest.raises(peftkit.ConfigError, match=r"adapter 'loha' cannot serve rows of a mixed-adapter batch: "
                                                  r"its LoHaLinear on 'model.layers.0.self_attn.q_proj'"):
        model(**inputs, adapter_names=["loha", "wide"])
    model(**inputs, adapter_names=["rs", "wide"])  # nothing was left half set up


def test_prompt_mixes_that_cannot_run_are_errors() -> None:
    model = tiny_llama()
    peftkit.apply(model, peftkit_config("prompt", tokens=3), name="three")
    peftkit.apply(model, peftkit_config("prompt", tokens=2), name="two")
    peftkit.apply(model, peftkit_config("prefix", tokens=3), name="prefix")
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False), name="lora")
    model.eval()
    inputs = model_inputs("llama", batch=2)
    for names, message in [
        (["three", "two"], r"one kind .* same num_virtual_tokens; found 'three': embeddings, 3 tokens, 'two': "),
        (["three", "prefix"], r"one kind"),
        (["three", "lora"], r"cannot share a batch with rows of 'lora'"),
        (["three", BASE], r"cannot share a batch with rows of '__base__'"),
    ]:
        with pytest.raises(peftkit.ConfigError, match=message):
            model(**inputs, adapter_names=names)


def test_other_per_call_arguments_are_still_refused() -> None:
    model = weight_adapters(tiny_gpt2(), "gpt2")
    inputs = model_inputs("gpt2")
    with pytest.raises(peftkit.ConfigError, match=r"alora_offsets= is not supported"):
        model(**inputs, adapter_names=["wide", "rs"], alora_offsets=[1, 1])


# -- torch.compile --------------------------------------------------------------------------


def test_compiled_models_do_not_break_graphs_or_recompile_for_states_seen() -> None:
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    model = weight_adapters(tiny_llama(), "llama")
    inputs = model_inputs("llama", batch=4)
    for extra in ({}, {"adapter_names": ["wide", "rs", "dora", BASE]}):
        explained = dynamo.explain(model)(**inputs, **extra)
        assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")

    def states():
        with torch.no_grad():
            peftkit.set_active(model, "wide")
            yield compiled(**inputs).logits
            peftkit.set_active(model, "rs")
            yield compiled(**inputs).logits
            with peftkit.disabled(model):
                yield compiled(**inputs).logits
            yield compiled(**inputs, adapter_names=["wide", "rs", "dora", BASE]).logits
            yield compiled(**inputs, adapter_names=["rs", BASE, "wide", "dora"]).logits  # same adapters, other rows

    first = list(states())
    frames = dict(counters["frames"])
    graphs = counters["stats"]["unique_graphs"]
    second = list(states())
    assert dict(counters["frames"]) == frames and counters["stats"]["unique_graphs"] == graphs
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(first[4], mixed(model, inputs, ["rs", BASE, "wide", "dora"]), atol=1e-5, rtol=1e-5)
    dynamo.reset()


def test_a_hotswap_under_a_compiled_mixed_batch_recompiles_nothing(tmp_path) -> None:
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    source = tiny_llama()
    torch.manual_seed(3)
    peftkit.apply(source, peftkit.LoraConfig(r=2, lora_alpha=7, target_modules="all-linear", init_lora_weights=False))
    peftkit.save(source, tmp_path / "other")
    model = tiny_llama()
    for name, r in (("a", 4), ("b", 2)):
        peftkit.apply(model, peftkit.LoraConfig(r=r, target_modules="all-linear", init_lora_weights=False), name=name)
    model.eval()
    peftkit.prepare_hotswap(model, 8)
    names = ["a", "b", BASE, "a"]
    inputs = model_inputs("llama", batch=4)
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        before = compiled(**inputs, adapter_names=names).logits
        graphs = counters["stats"]["unique_graphs"]
        peftkit.hotswap(model, tmp_path / "other", "b")
        after = compiled(**inputs, adapter_names=names).logits
    assert counters["stats"]["unique_graphs"] == graphs
    assert (after[1] - before[1]).abs().max() > 1e-3 and torch.equal(after[0], before[0])
    fresh = tiny_llama()
    peftkit.load(fresh, tmp_path / "other")
    torch.testing.assert_close(after[1:2], row_by_row(fresh.eval(), {k: v[1:2] for k, v in inputs.items()}, ["default"]),
                               atol=1e-5, rtol=1e-5)
    dynamo.reset()


def test_an_adapter_that_rewrote_the_base_serves_only_its_own_rows() -> None:
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoraConfig(r=2, init_lora_weights=False), name="plain")
    peftkit.apply(model, peftkit.LoraConfig(r=2, init_lora_weights="pissa"), name="pissa")
    model.eval()
    inputs = model_inputs("llama", batch=2)
    for names in (["pissa", "plain"], ["pissa", BASE], ["plain", BASE]):
        with pytest.raises(peftkit.ConfigError, match=r"adapter\(s\) 'pissa' replaced the base weights by a residual"):
            model(**inputs, adapter_names=names)
    torch.testing.assert_close(mixed(model, inputs, ["pissa", "pissa"]), row_by_row(model, inputs, ["pissa", "pissa"]),
                               atol=1e-5, rtol=1e-5)


def test_inference_under_bf16_autocast_runs_and_stays_close_to_float32() -> None:
    model = weight_adapters(tiny_llama(), "llama")
    peftkit.set_active(model, "wide")
    inputs = model_inputs("llama", batch=3)
    names = ["wide", "rs", BASE]
    with torch.no_grad():
        plain, mix = model(**inputs).logits, model(**inputs, adapter_names=names).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):  # in-place adds must not meet autocast's dtypes
            plain16, mix16 = model(**inputs).logits, model(**inputs, adapter_names=names).logits
    torch.testing.assert_close(plain16.float(), plain, atol=0.1, rtol=0.05)
    torch.testing.assert_close(mix16.float(), mix, atol=0.1, rtol=0.05)
