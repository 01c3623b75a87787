"""``peftkit plan --budget``: which methods, ranks, batch sizes and checkpointing choices fit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .case import FULL, HEADROOM, RANKS, VALIDATED_CPU, Case
from .predict import Plan, predict, predict_many

RULE = (f"the configuration with the most trainable parameters whose predicted peak is at most "
        f"{1 - HEADROOM:.0%} of the budget ({HEADROOM:.0%} headroom); among those the largest batch size, "
        f"then without gradient checkpointing (faster)")


@dataclass
class Candidate:
    method: str
    r: int | None
    batch_size: int
    gradient_checkpointing: bool
    peak_bytes: int
    trainable_params: int
    fits: bool


def _lerp(lo: float, hi: float, x: float, x0: float, x1: float) -> float:
    return lo if x1 == x0 else lo + (hi - lo) * (x - x0) / (x1 - x0)


def search(case: Case, budget: int, methods: tuple[str, ...] = VALIDATED_CPU,
           ) -> tuple[Plan, list[Candidate], Candidate | None]:
    """Every method of ``methods`` (r in ``RANKS`` for the rank methods), batch size (powers of two
    up to ``case.batch_size``) and checkpointing choice, with its predicted peak; and the one
    ``RULE`` recommends (None: nothing fits); first, ``case``'s own prediction (made in the same process).

    Simulated at the corners (r 4 and 64, batch 1 and ``case.batch_size``) and bilinear in
    between: every tensor of a run grows linearly with the batch and with the rank (the adapter,
    its gradients and state, its (batch, length, r) activations). The recommendation itself is
    predicted directly and replaced by the next one if it does not fit after all."""
    from ..train.options import CLI_METHODS

    batches = sorted({2 ** i for i in range(case.batch_size.bit_length()) if 2 ** i <= case.batch_size}
                     | {case.batch_size})
    b0, b1 = batches[0], batches[-1]
    grid = []  # (method, checkpointing, ranks, corner cases)
    for method in methods:
        ranked = method != FULL and "r" in CLI_METHODS[method][1].options
        can_gc = method == FULL or CLI_METHODS[method][0].gradient_checkpointing
        for gc in ((False, True) if can_gc else (False,)):
            corners = [(r, b) for r in ((RANKS[0], RANKS[-1]) if ranked else (None,)) for b in dict.fromkeys((b0, b1))]
            tokens = case.virtual_tokens if method != FULL and "virtual_tokens" in CLI_METHODS[method][1].options else None
            cases = [dataclasses.replace(case, method=method, r=r, batch_size=b, gradient_checkpointing=gc,
                                         virtual_tokens=tokens, quantize=None if method == FULL else case.quantize)
                     for r, b in corners]
            grid.append((method, gc, RANKS if ranked else (None,), corners, cases))
    plans = iter(predict_many([case] + [c for *_, cases in grid for c in cases]))
    own = next(plans)
    out: list[Candidate] = []
    for method, gc, ranks, corners, cases in grid:
        corner = {rb: next(plans) for rb in corners}
        r0, r1 = corners[0][0], corners[-1][0]
        for r in ranks:
            for b in batches:
                def at(field: str) -> float:
                    lo = _lerp(getattr(corner[(r0, b0)], field), getattr(corner[(r0, b1)], field), b, b0, b1)
                    hi = _lerp(getattr(corner[(r1, b0)], field), getattr(corner[(r1, b1)], field), b, b0, b1)
                    return _lerp(lo, hi, r or 0, r0 or 0, r1 or 0)
                peak = int(at("peak_bytes"))
                out.append(Candidate(method, r, b, gc, peak, int(round(at("trainable_params"))),
                                     peak <= budget * (1 - HEADROOM)))
    out.sort(key=lambda c: (not c.fits, -c.trainable_params, -c.batch_size, c.gradient_checkpointing, c.peak_bytes))
    for pick in (c for c in out if c.fits):
        corners = [rb for method, gc, _, rbs, _ in grid if (method, gc) == (pick.method, pick.gradient_checkpointing)
                   for rb in rbs]
        if (pick.r, pick.batch_size) in corners:
            return own, out, pick  # simulated, not interpolated
        tokens = case.virtual_tokens if pick.method in ("prompt", "ptuning", "prefix") else None
        exact = predict(dataclasses.replace(case, method=pick.method, r=pick.r, batch_size=pick.batch_size,
                                            gradient_checkpointing=pick.gradient_checkpointing, virtual_tokens=tokens,
                                            quantize=None if pick.method == FULL else case.quantize))
        pick.peak_bytes, pick.trainable_params = exact.peak_bytes, exact.trainable_params
        if exact.peak_bytes <= budget * (1 - HEADROOM):
            return own, out, pick
        pick.fits = False
    return own, out, None
