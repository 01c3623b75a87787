"""The suite's figures as people read them: ratios, the targets of issue #14 met or missed, the
profiles of the misses, the table and plot in BENCHMARKS.md.

A ratio is the median over rounds of the ratio within a round (both sides were timed one after
the other in that round), with the lower and upper quartile beside it: a machine that slows
down for a while slows both sides of a round, not one of them.
"""

from __future__ import annotations

import statistics
from pathlib import Path

MARK_BEGIN, MARK_END = "<!-- suite:begin -->", "<!-- suite:end -->"
PROFILE_BEGIN, PROFILE_END = "<!-- suite-profile:begin -->", "<!-- suite-profile:end -->"


def ratio(rounds: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float] | None:
    """(median, lower quartile, upper quartile) of a/b over the rounds; None if a side is missing."""
    if a not in rounds or b not in rounds:
        return None
    values = sorted(x / y for x, y in zip(rounds[a], rounds[b]))
    if len(values) < 4:
        return statistics.median(values), values[0], values[-1]
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), q[0], q[2]


# (methods, what, section, numerator, denominator, limit): the targets of the issue.
TARGETS = [
    (("lora", "lora_all"), "step / HF PEFT", "train", "peftkit", "hf_peft", 0.90),
    (("lora",), "step / floor", "train", "peftkit", "floor", 1.05),
    (("lora_all",), "step / floor", "train", "peftkit", "floor", 1.15),
    (("lora", "lora_all"), "unmerged inference / base", "infer", "peftkit", "base", 1.05),
    (("dora",), "step / peftkit LoRA", "train", "peftkit", "peftkit_lora", 1.15),
    (("dora",), "step / HF PEFT DoRA", "train", "peftkit", "hf_peft", 1.00),
    (None, "step / HF PEFT", "train", "peftkit", "hf_peft", 1.00),  # every other method HF PEFT has
    (None, "merged inference / base", "infer", "peftkit_merged", "base", 1.03),  # "within noise"
]
OWN_STEP_TARGETS = {"lora", "lora_all", "dora"}  # their step target is stated above, not the generic one


def targets(result: dict) -> list[dict]:
    """Every target that applies to one (model, method) result, with its measured ratio and
    verdict: ``met`` (median within the limit), ``noise`` (only the lower quartile is), ``missed``."""
    out = []
    method = result["method"]
    for methods, what, section, a, b, limit in TARGETS:
        if methods is None and what.startswith("step") and method in OWN_STEP_TARGETS:
            continue
        if methods is not None and method not in methods:
            continue
        r = ratio(result[f"{section}_rounds"], a, b)
        if r is None:
            continue
        median, low, high = r
        verdict = "met" if median <= limit else "noise" if low <= limit else "missed"
        out.append({"model": result["model"], "method": method, "target": what, "limit": limit,
                    "ratio": median, "low": low, "high": high, "verdict": verdict, "section": section})
    peak = result.get("peak_bytes", {})
    if "hf_peft" in peak and "peftkit" in peak:
        r = peak["peftkit"] / peak["hf_peft"]
        out.append({"model": result["model"], "method": method, "target": "peak memory / HF PEFT", "limit": 1.0,
                    "ratio": r, "low": r, "high": r, "verdict": "met" if r <= 1.0 else "missed", "section": "peak"})
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _r(rounds: dict, a: str, b: str) -> str:
    r = ratio(rounds, a, b)
    return f"{r[0]:.2f}" if r else "—"


def table(results: list[dict], floors: dict) -> str:
    lines = ["| model | method | step: floor | peftkit | HF PEFT | **peftkit / floor** | **peftkit / HF** | "
             "infer: peftkit / base | HF / base | merged / base | peak: peftkit | HF | floor | "
             "load: peftkit | HF | file |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, tr, ir = r["train_ms"], r["train_rounds"], r["infer_rounds"]
        p, load = r.get("peak_bytes", {}), r["load_ms"]
        hf = t.get("hf_peft")
        peak = {lib: _mib(p[lib]) if lib in p else "—" for lib in ("peftkit", "hf_peft")}
        hf_load = f"{load['hf_peft']:.0f} ms" if "hf_peft" in load else "—"
        floor_peak = _mib(floors[r["model"]]) if r["model"] in floors else "—"
        lines.append(
            f"| {r['model']} | {r['method']} | {t['floor']:.0f} ms | {t['peftkit']:.0f} ms | "
            f"{f'{hf:.0f} ms' if hf else '—'} | **{_r(tr, 'peftkit', 'floor')}** | **{_r(tr, 'peftkit', 'hf_peft')}** | "
            f"{_r(ir, 'peftkit', 'base')} | {_r(ir, 'hf_peft', 'base')} | {_r(ir, 'peftkit_merged', 'base')} | "
            f"{peak['peftkit']} | {peak['hf_peft']} | {floor_peak} | "
            f"{load['peftkit']:.0f} ms | {hf_load} | {_mib(r['file_bytes']['peftkit'])} |")
    refused = [f"{r['model']} / {r['method']}: HF PEFT failed ({why})" for r in results
               for lib, why in r.get("unavailable", {}).items()]
    if refused:
        lines.append("\n" + "; ".join(refused) + ".")
    return "\n".join(lines)


def targets_table(rows: list[dict]) -> str:
    marks = {"met": "met", "noise": "within noise", "missed": "**missed**"}
    lines = ["| model | method | target | limit | measured (quartiles) | |", "|---|---|---|---|---|---|"]
    for t in rows:
        spread = f" ({t['low']:.2f}–{t['high']:.2f})" if t["section"] != "peak" else ""
        lines.append(f"| {t['model']} | {t['method']} | {t['target']} | ≤ {t['limit']:.2f} | "
                     f"{t['ratio']:.2f}{spread} | {marks[t['verdict']]} |")
    met = sum(t["verdict"] == "met" for t in rows)
    lines.append(f"\n{met} of {len(rows)} targets met; "
                 f"{sum(t['verdict'] == 'noise' for t in rows)} within the rounds' noise; "
                 f"{sum(t['verdict'] == 'missed' for t in rows)} missed.")
    return "\n".join(lines)


def profile_table(profile: dict) -> str:
    """One missed step target: the operators' self CPU time per step, floor beside peftkit,
    largest differences first."""
    ops = profile["ops"]
    lines = [f"**{profile['model']} / {profile['method']}** — {profile['target']} {profile['ratio']:.2f} "
             f"(limit {profile['limit']:.2f}); self CPU ms per step, {profile['steps']} profiled steps each:",
             "", "| operator | floor | peftkit | difference | calls (floor / peftkit) |", "|---|---|---|---|---|"]
    total_f = sum(o["floor_ms"] for o in ops.values())
    total_p = sum(o["peftkit_ms"] for o in ops.values())
    rows = sorted(ops.items(), key=lambda kv: -abs(kv[1]["peftkit_ms"] - kv[1]["floor_ms"]))[:12]
    for name, o in rows:
        lines.append(f"| `{name}` | {o['floor_ms']:.1f} | {o['peftkit_ms']:.1f} | "
                     f"{o['peftkit_ms'] - o['floor_ms']:+.1f} | {o['floor_calls']} / {o['peftkit_calls']} |")
    lines.append(f"| all operators | {total_f:.1f} | {total_p:.1f} | {total_p - total_f:+.1f} | |")
    lines.append(f"\nOf peftkit's time, AdamW's step (the floor has none): {profile.get('optimizer_ms', 0.0):.1f} ms.")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 3.6 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        rows = [r for r in results if r["model"] == model]
        x = range(len(rows))
        ours = [(ratio(r["train_rounds"], "peftkit", "floor") or (float("nan"),))[0] for r in rows]
        theirs = [(ratio(r["train_rounds"], "hf_peft", "floor") or (float("nan"),))[0] for r in rows]
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="peftkit")
        ax.bar([i + 0.2 for i in x], theirs, 0.4, label="HF PEFT")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(x), [r["method"] for r in rows], rotation=30)
        ax.set_ylabel("training step / floor")
        ax.set_title(f"{model}: step time over the floor (frozen forward + backward to the inputs)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _replace_between(text: str, begin: str, end: str, body: str, heading: str) -> str:
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        start, stop = text.index(begin), text.index(end) + len(end)
        return text[:start] + block + text[stop:]
    return text + f"\n{heading}\n\n{block}\n"


def write_markdown(path: Path, results: list[dict], floors: dict, info: dict, command: str,
                   target_rows: list[dict], profiles: list[dict]) -> None:
    body = (f"```\n{command}\n```\n\nMachine: {info['cpu']}, AVX512-BF16 "
            f"{'yes' if info['avx512_bf16'] else 'no'}, {info['threads']} threads of {info['cores']} cores, "
            f"OMP_WAIT_POLICY {info['omp_wait_policy']}; torch {info['torch']}, transformers {info['transformers']}, "
            f"peft {info['peft']}; measured {info['date']} ({info['minutes']:.0f} minutes). Ratios: median over "
            f"the rounds of the ratio within each round.\n\n{table(results, floors)}\n\n"
            f"![step time over the floor](benchmarks/results.png)\n\n### Targets\n\n{targets_table(target_rows)}")
    text = _replace_between(path.read_text(), MARK_BEGIN, MARK_END, body, "## The benchmark suite (`make bench`)")
    if profiles:
        prof = "\n\n".join(profile_table(p) for p in profiles)
        text = _replace_between(text, PROFILE_BEGIN, PROFILE_END, prof,
                                "### Where the time goes in the missed step targets (`torch.profiler`)")
    path.write_text(text)
