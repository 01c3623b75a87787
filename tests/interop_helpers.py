"""Shared pieces of the interop tests (peftkit beside HF PEFT): running a model, perturbing the
trainable parameters as training would, comparing outputs."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

ATOL = 1e-5


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def perturb_trainable(model: nn.Module, seed: int = 3, scale: float = 0.2) -> int:
    """Stand-in for training: move every trainable parameter; returns how many were moved."""
    g = torch.Generator().manual_seed(seed)
    moved = 0
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
                moved += 1
    return moved


def assert_same(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor | None = None, atol: float = ATOL) -> None:
    """``got`` equals ``want``; and, when ``base`` is given, the adapter visibly changed it."""
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"outputs differ by {diff:.3g} (atol {atol:g})"
    if base is not None:
        moved = (want - base).abs().max().item()
        assert moved > 1e-3, f"the adapter does not change the output ({moved:.3g}); the test would prove nothing"


def hf_from_pretrained(base: nn.Module, directory) -> nn.Module:
    """HF PEFT's ``PeftModel.from_pretrained`` of ``directory`` over ``base``, in eval mode; HF
    must not warn of missing adapter keys or unknown config fields."""
    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, directory).eval()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing adapter keys" in m or "Unexpected keyword" in m], messages
    return model


def check_saved_file_in_hf(model: nn.Module, build, batch: dict, directory, quiet: type[Warning] = UserWarning) -> None:
    """``model`` (peftkit, trained) saved to ``directory`` loads in HF PEFT over ``build()`` with
    equal outputs, and both merge alike (outputs and state dicts); ``quiet``: HF's warnings to ignore."""
    import peftkit

    model.eval()
    want = run(model, batch)
    peftkit.save(model, directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", quiet)
        hf = hf_from_pretrained(build(), directory)
    assert_same(run(hf, batch), want, run(build(), batch))
    merged = hf.merge_and_unload()
    peftkit.unload(model, merge=True)
    assert_same(run(model, batch), run(merged, batch))
    ours, theirs = model.state_dict(), merged.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key
