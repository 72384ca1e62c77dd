"""Selection on ID validation, frontier gains per seed, and the outputs: summary.json, summary.md, frontier.png.

Selection reads only the ``id_val`` column of each finished cell: every setting (learning rate) of a method is
scored by its mean ID validation accuracy over seeds and the best one is kept (ties: the smaller rate). OOD numbers
are only *reported* for the selected setting, never compared to choose. A ``<method>+wiseft`` row is the method's
selected model mixed with its start (fine-tune as usual, then interpolate), not a separate selection.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_robustft.compare.frontier import FrontierGain, Point, best_frontier_gain, frontier_gain, logit_fit
from lightning_robustft.compare.presets import Method

__all__ = ["ZERO_SHOT", "markdown", "plot_frontier", "select_setting", "summarize", "write_json"]

ZERO_SHOT = "zero-shot"
_ALPHA_TOLERANCE = 1e-9


def _point(row: Mapping[str, Any], id_key: str) -> Point:
    return (row[id_key], row["ood_avg"])


def _row_at(curve: Sequence[Mapping[str, Any]], alpha: float) -> Mapping[str, Any]:
    return next(row for row in curve if abs(row["alpha"] - alpha) < _ALPHA_TOLERANCE)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def select_setting(runs: Mapping[float | None, Sequence[Mapping[str, Any]]], alpha: float) -> float | None:
    """The setting (learning rate) whose reported model has the best mean **ID validation** accuracy over seeds.

    Args:
        runs: ``{lr: [result of each seed]}`` of one method.
        alpha: the point of each run's curve that the method reports (1: the endpoint; the ``+wiseft`` alpha).

    Ties go to the smaller learning rate (the more conservative fine-tune). Only ``id_val`` is read.
    """

    def score(lr: float | None) -> tuple[float, float]:
        ids = [_row_at(run["curve"], alpha)["id_val"] for run in runs[lr]]
        return statistics.fmean(ids), -(lr or 0.0)

    return max(runs, key=score)


def summarize(
    results: Sequence[Mapping[str, Any]], methods: Sequence[Method], baseline: Sequence[str], wiseft_alpha: float
) -> dict[str, Any]:
    """The comparison: per method, the selected setting and its ID, OOD, frontier gains and paired differences.

    Args:
        results: the finished cells (``result.json`` contents).
        methods: the compared methods, in table order.
        baseline: the presets whose curves form the frontier (``ft`` and possibly ``lpft``).
        wiseft_alpha: the alpha of ``+wiseft`` methods.

    Returns:
        ``{"id_metric", "baseline", "seeds", "methods": {name: {...}}, "effective_robustness_fit"}``; accuracies,
        gains and differences in percent.
    """
    id_key = "id_test" if results and all("id_test" in r["curve"][0] for r in results) else "id_val"
    seeds = sorted({r["seed"] for r in results})
    frontier: dict[int, list[list[Point]]] = {seed: [] for seed in seeds}
    for result in results:
        if result["method"] in baseline:
            frontier[result["seed"]].append([_point(row, id_key) for row in result["curve"]])
    fit = logit_fit([_point(r["curve"][-1], id_key) for r in results if r["method"] in baseline])
    by_method: dict[str, dict[float | None, list[Mapping[str, Any]]]] = {}
    for result in results:
        by_method.setdefault(result["method"], {}).setdefault(result["lr"], []).append(result)

    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    summary: dict[str, Any] = {}
    ft_runs = by_method.get("ft", {})
    if ft_runs:  # the start of every ft curve: the model before fine-tuning
        zero_shot = {r["seed"]: r["curve"][0] for runs in ft_runs.values() for r in runs}
        per_seed[ZERO_SHOT] = {
            seed: _seed_entry(row, [row], frontier[seed], id_key, fit) for seed, row in sorted(zero_shot.items())
        }
        summary[ZERO_SHOT] = {**_aggregate(per_seed[ZERO_SHOT], selected={}), "settings": "the starting model"}
    for method in methods:
        runs = by_method.get(method.trained or method.name, {})
        if not runs:
            continue
        alpha = wiseft_alpha if method.wiseft else 1.0
        # `+wiseft` is WiSE-FT as the paper does it: the method's selected model, then mixed with its start.
        lr = select_setting(runs, 1.0)
        per_seed[method.name] = {
            r["seed"]: _seed_entry(_row_at(r["curve"], alpha), r["curve"], frontier[r["seed"]], id_key, fit)
            for r in sorted(runs[lr], key=lambda r: r["seed"])
        }
        selected: dict[str, Any] = dict(runs[lr][0]["hparams"])
        if method.wiseft:
            selected["wiseft_alpha"] = wiseft_alpha
        summary[method.name] = _aggregate(per_seed[method.name], selected)
        summary[method.name]["settings"] = runs[lr][0].get("settings", "")
    reference = per_seed.get("ft", {})
    for name, entry in summary.items():
        entry["paired_vs_ft"] = _paired(per_seed[name], reference)
    return {
        "id_metric": id_key,
        "baseline": list(baseline),
        "seeds": seeds,
        "methods": summary,
        "per_seed": {name: {str(seed): e for seed, e in entries.items()} for name, entries in per_seed.items()},
        "effective_robustness_fit": None if fit is None else vars(fit),
    }


def _seed_entry(
    row: Mapping[str, Any],
    curve: Sequence[Mapping[str, Any]],
    baseline: Sequence[Sequence[Point]],
    id_key: str,
    fit: Any,
) -> dict[str, Any]:
    point = _point(row, id_key)
    if not baseline:  # every baseline cell of this seed failed: nothing to compare with
        gain, best = FrontierGain(None, None, "no_baseline"), None
    else:
        gain = frontier_gain(point, baseline)
        # the start (alpha 0) is not the method's: zero-shot lies on every ft curve, so it would score 0 for free
        moved = [r for r in curve if r["alpha"] > 0] or list(curve)
        best_of = best_frontier_gain([_point(r, id_key) for r in moved], baseline)
        best = None if best_of is None else (best_of[0], curve.index(moved[best_of[1]]))
    return {
        "id_acc": 100 * point[0],
        "ood_avg": 100 * point[1],
        "id_val": 100 * row["id_val"],
        "frontier_gain": None if gain.gain is None else 100 * gain.gain,
        "frontier_status": gain.status,
        "best_frontier_gain": None if best is None else 100 * best[0].gain,  # type: ignore[operator]
        "best_alpha": None if best is None else curve[best[1]]["alpha"],
        "effective_robustness": None if fit is None else 100 * fit.effective_robustness(point),
        "sets": {name: 100 * value for name, value in row["sets"].items()},
    }


def _aggregate(entries: Mapping[int, Mapping[str, Any]], selected: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("id_acc", "ood_avg", "frontier_gain", "best_frontier_gain", "effective_robustness"):
        mean, std = _mean_std([e[key] for e in entries.values() if e[key] is not None])
        out[key], out[f"{key}_std"] = mean, std
    out["frontier_above_range"] = sum(e["frontier_status"] == "above" for e in entries.values())
    out["selected"] = dict(selected)
    out["seeds"] = sorted(entries)
    return out


def _paired(entries: Mapping[int, Mapping[str, Any]], reference: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-seed differences to full FT (each seed redraws data, which moves every method together)."""
    seeds = sorted(set(entries) & set(reference))
    out: dict[str, Any] = {"seeds": seeds}
    for key in ("id_acc", "ood_avg"):
        mean, std = _mean_std([entries[s][key] - reference[s][key] for s in seeds])
        out[f"d_{key}"], out[f"d_{key}_std"] = mean, std
    return out


# ---------------------------------------------------------------------------------------------------- outputs
def _pm(entry: Mapping[str, Any], key: str, signed: bool = False) -> str:
    mean, std = entry.get(key), entry.get(f"{key}_std")
    if mean is None:
        return "–"
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"


def markdown(summary: Mapping[str, Any], failed: Sequence[str], command: str | None = None) -> str:
    """``summary.md``: the table (mean ± std over seeds) and the paired differences to full FT."""
    id_name = "ID test" if summary["id_metric"] == "id_test" else "ID val"
    header = [
        "method",
        "settings",
        "selected",
        f"{id_name} (%)",
        "OOD avg (%)",
        "frontier gain",
        "best frontier gain",
        "eff. robustness",
        "Δ ID vs ft",
        "Δ OOD vs ft",
        "seeds",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, entry in summary["methods"].items():
        selected = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry["selected"].items())
        gain = _pm(entry, "frontier_gain", signed=True)
        if entry["frontier_above_range"]:
            gain += f" ({entry['frontier_above_range']} above range)"
        paired = entry["paired_vs_ft"]
        cells = [
            name,
            entry.get("settings", ""),
            selected or "–",
            _pm(entry, "id_acc"),
            _pm(entry, "ood_avg"),
            gain,
            _pm(entry, "best_frontier_gain", signed=True),
            _pm(entry, "effective_robustness", signed=True),
            _pm(paired, "d_id_acc", signed=True) if name != "ft" else "–",
            _pm(paired, "d_ood_avg", signed=True) if name != "ft" else "–",
            str(len(entry["seeds"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Accuracies in percent, mean ± std over seeds {summary['seeds']}; settings selected on ID validation only. "
        f"Frontier gain: OOD average minus the upper envelope of the WiSE-FT curves of every {summary['baseline']} "
        "run of the same seed, at the same ID accuracy (points past the envelope's highest ID have none and are "
        "counted; points below its lowest are compared with the best baseline point of higher ID). Best frontier "
        "gain: the best point of the method's own WiSE-FT curve. Effective robustness: OOD above the logit-space "
        "linear fit of the baseline endpoints. Δ: paired per-seed differences to `ft`.",
    ]
    lines += ["", *_paired_table(summary)]
    if failed:
        lines += ["", f"Failed cells (not in the table; see their error.txt): {', '.join(failed)}."]
    if command:
        lines += ["", f"Produced by `{command}`."]
    return "\n".join(lines) + "\n"


def _paired_table(summary: Mapping[str, Any]) -> list[str]:
    """Per seed, each method's difference to ``ft`` (ID, OOD average) and its frontier gain, in points."""
    per_seed = summary["per_seed"]
    reference = per_seed.get("ft", {})
    seeds = [str(seed) for seed in summary["seeds"]]
    lines = [
        "Per seed: Δ ID / Δ OOD avg vs `ft` (points), then the frontier gain.",
        "",
        "| method | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|" + " --- |" * (len(seeds) + 1),
    ]
    for name, entries in per_seed.items():
        cells = []
        for seed in seeds:
            entry, base = entries.get(seed), reference.get(seed)
            if entry is None or base is None:
                cells.append("–")
                continue
            gain = "–" if entry["frontier_gain"] is None else f"{entry['frontier_gain']:+.1f}"
            delta = f"{entry['id_acc'] - base['id_acc']:+.1f} / {entry['ood_avg'] - base['ood_avg']:+.1f}"
            cells.append(f"{delta}; {gain}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_json(summary: Mapping[str, Any], path: Path) -> None:
    """``summary.json``, numbers rounded to 3 decimals (percent)."""
    path.write_text(json.dumps(_rounded(summary), indent=1) + "\n")


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, Mapping):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def plot_frontier(
    results: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], methods: Sequence[Method], path: Path
) -> None:
    """``frontier.png``: every method's WiSE-FT curve (selected setting, mean over seeds) on the ID-OOD plane.

    The baseline's curves at every learning rate are drawn thin and grey (their envelope is the frontier); full FT's
    selected curve is black; zero-shot is a black cross; each method's reported point is a large marker.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    id_key = summary["id_metric"]
    figure = Figure(figsize=(8.5, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    by_setting: dict[tuple[str, float | None], list[Mapping[str, Any]]] = {}
    for result in results:
        by_setting.setdefault((result["method"], result["lr"]), []).append(result)

    def mean_curve(runs: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
        rows = list(zip(*(r["curve"] for r in runs), strict=True))
        return (
            [100 * statistics.fmean(r[id_key] for r in group) for group in rows],
            [100 * statistics.fmean(r["ood_avg"] for r in group) for group in rows],
        )

    for (name, _lr), runs in by_setting.items():
        if name in summary["baseline"]:
            xs, ys = mean_curve(runs)
            axes.plot(xs, ys, color="0.75", lw=0.8, zorder=1)
    palette = colormaps["tab10"]
    trained = list(dict.fromkeys(m.trained or m.name for m in methods if m.name != "ft"))
    colours = {name: palette(index % 10) for index, name in enumerate(trained)} | {"ft": "black"}
    drawn: set[tuple[str, float | None]] = set()
    for method in methods:
        entry = summary["methods"].get(method.name)
        if entry is None:
            continue
        name = method.trained or method.name
        lr = next((r["lr"] for r in results if r["method"] == name and _same_hparams(r, entry)), None)
        runs = by_setting.get((name, lr), [])
        if runs and (name, lr) not in drawn:  # one curve per trained setting; a `+wiseft` point sits on it
            drawn.add((name, lr))
            xs, ys = mean_curve(runs)
            axes.plot(xs, ys, "-", color=colours[name], lw=2 if name == "ft" else 1.3, marker=".", ms=4, zorder=2)
        marker = "*" if method.wiseft else ("s" if method.name == "greedy_soup" else "o")
        size = 14 if method.wiseft else 10
        axes.plot(entry["id_acc"], entry["ood_avg"], marker, color=colours[name], ms=size, label=method.name, ls="")
    if ZERO_SHOT in summary["methods"]:
        zero = summary["methods"][ZERO_SHOT]
        axes.plot(zero["id_acc"], zero["ood_avg"], "X", color="black", ms=11, label=ZERO_SHOT, ls="")
    axes.set_xlabel(("ID test" if id_key == "id_test" else "ID validation") + " accuracy (%)")
    axes.set_ylabel("OOD-average accuracy (%)")
    axes.set_title(
        f"WiSE-FT curves, mean over {len(summary['seeds'])} seed(s); grey: {'+'.join(summary['baseline'])} at every lr"
    )
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path, dpi=150)


def _same_hparams(result: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    selected = {k: v for k, v in entry["selected"].items() if k != "wiseft_alpha"}
    return dict(result["hparams"]) == selected
