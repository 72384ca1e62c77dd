"""``compare(...)``: the Python entry point of ``robustft compare`` (the command line only parses into it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_robustft.compare.grid import (
    Grid,
    check_grid,
    is_finished,
    load_base_config,
    load_results,
    run_cells,
    shard_cells,
)
from lightning_robustft.compare.presets import load_presets, resolve_methods
from lightning_robustft.compare.summary import markdown, plot_frontier, summarize, write_json
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.weight_space import DEFAULT_ALPHAS

__all__ = ["compare", "write_outputs"]


def compare(
    config: str | Path,
    methods: Sequence[str],
    *,
    seeds: Sequence[int] = (0,),
    lrs: Sequence[float] | None = None,
    method_lrs: Mapping[str, Sequence[float]] | None = None,
    out: str | Path = "robustft_compare",
    presets: str | Path | None = None,
    baseline: Sequence[str] = ("ft",),
    alphas: Sequence[float] | None = None,
    wiseft_alpha: float = 0.5,
    eval_batches: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
    summarize_only: bool = False,
    dry_run: bool = False,
    command: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Compare fine-tuning methods on the ID-OOD plane over the user's own ``robustft fit`` config.

    Every (method, learning rate, seed) is a ``robustft fit`` of ``config`` with the method's preset added; each
    trained model's WiSE-FT curve is evaluated; settings are chosen on ID validation only; frontier gains are taken
    against the upper envelope of the ``baseline`` runs' curves. See ``docs/compare.md``.

    Args:
        config: the base YAML (what ``robustft fit --config`` takes: any model, any data module).
        methods: method names: presets (``ft``, ``gmixout``, ``mixout``, ``gmixout_sparse``, ``dropout_head``,
            ``l2sp``, ``kd``, ``lora``, ``lp``, ``lpft`` or the user's), ``<method>+wiseft``, ``wiseft`` (=
            ``ft+wiseft``) and ``greedy_soup``.
        seeds: the seeds (``seed_everything``, and the data module's ``seed`` argument when the config sets one).
        lrs: learning rates of the grid (each preset may scale them); ``None``: the config's own.
        method_lrs: ``{preset: rates}`` for presets that train at their own rates instead (as given, unscaled):
            e.g. ``{"ft": [1e-4, 3e-4, 1e-3]}`` for a denser baseline frontier, or one rate for a lever sweep.
        out: the output folder; rerunning with the same folder skips finished cells.
        presets: a YAML file of user presets (``name: {callbacks: [...], model: {...}, lr_scale, start}``).
        baseline: the presets whose WiSE-FT curves make the frontier (must include ``ft``; add ``lpft`` when the
            model starts without a zero-shot head).
        alphas: the WiSE-FT curve's coefficients (default 0, 0.1, ..., 1; 0, 1 and ``wiseft_alpha`` always added).
        wiseft_alpha: the coefficient of the ``+wiseft`` methods (0.5, WiSE-FT's choice without OOD data).
        eval_batches: evaluate at most this many batches of each set on the curves (``None``: whole sets); for a
            quick look when the evaluation sets are large. The soup is chosen on as many ID validation batches.
        overrides: ``{"trainer.max_epochs": 3, ...}`` applied to the base config (dotted keys).
        shard: ``(i, N)``: run only every N-th cell from the i-th; several shards can share ``out``.
        summarize_only: run nothing but the soups whose ingredients are finished, then write the summary.
        dry_run: check everything, list the cells (the shard's) and how many are finished, run nothing.
        command: the command line to record in ``summary.md``.
        echo: where progress lines go.

    Returns:
        The summary (as in ``summary.json``), or ``None`` for a shard (run ``summarize_only`` after all shards)
        and a dry run.

    Raises:
        RobustFTConfigError: a bad method, preset, hyperparameter, seed list or shard, before any training starts.
    """
    known = load_presets(presets)
    grid = Grid(
        config=load_base_config(config, overrides),
        config_path=Path(config),
        methods=resolve_methods(list(methods), known),
        presets=known,
        seeds=[int(seed) for seed in seeds],
        lrs=None if lrs is None else list(lrs),
        out=Path(out),
        baseline=list(baseline),
        alphas=list(DEFAULT_ALPHAS if alphas is None else alphas),
        wiseft_alpha=wiseft_alpha,
        eval_batches=eval_batches,
        method_lrs={name: list(rates) for name, rates in (method_lrs or {}).items()},
    )
    check_grid(grid)
    cells = shard_cells(grid.cells(), None if summarize_only else shard)
    if dry_run:
        finished = [cell for cell in cells if is_finished(grid, cell)]
        echo(f"compare: {len(cells)} cells, {len(finished)} finished, {len(cells) - len(finished)} to run:")
        for cell in cells:
            echo(f"  {cell.key}{' (finished)' if cell in finished else ''}")
        return None
    grid.out.mkdir(parents=True, exist_ok=True)
    report = run_cells(grid, cells, derived_only=summarize_only, echo=echo)
    if shard is not None and not summarize_only:
        echo(f"compare: shard {shard[0]}/{shard[1]} done; after every shard, run the same command with --summarize.")
        return None
    return write_outputs(grid, report, command, echo)


def write_outputs(
    grid: Grid, report: Mapping[str, Sequence[str]], command: str | None, echo: Callable[[str], None]
) -> dict[str, Any]:
    """Write ``runs.jsonl``, ``summary.json``, ``summary.md`` and ``frontier.png`` from every finished cell."""
    results = load_results(grid)
    if not any(r["method"] == "ft" for r in results):
        raise RobustFTConfigError(
            f"No finished `ft` cell in {grid.out}: the frontier is built from them (see the cells' error.txt)."
        )
    finished = {r["cell"] for r in results}
    failed = [cell.key for cell in grid.cells() if cell.key not in finished]
    with open(grid.out / "runs.jsonl", "w") as handle:
        for result in results:
            handle.write(json.dumps({k: v for k, v in result.items() if k != "fingerprint"}) + "\n")
    summary = summarize(results, grid.methods, grid.baseline, grid.wiseft_alpha)
    summary = {"config": str(grid.config_path), "wiseft_alpha": grid.wiseft_alpha, **summary, "unfinished": failed}
    write_json(summary, grid.out / "summary.json")
    (grid.out / "summary.md").write_text(markdown(summary, failed, command))
    plot_frontier(results, summary, grid.methods, grid.out / "frontier.png")
    if report.get("failed") or failed:
        echo(f"compare: {len(failed)} cell(s) unfinished: {', '.join(failed)}.")
    echo(f"compare: wrote runs.jsonl, summary.json, summary.md and frontier.png to {grid.out}.")
    return summary
