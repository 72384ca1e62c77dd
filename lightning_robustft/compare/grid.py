"""The grid of ``robustft compare``: cells, their configs, running them, and resuming.

Every trained cell (method, learning rate, seed) is an ordinary ``robustft fit`` of the user's base YAML with the
method's callbacks and model overrides added: its merged config is written to ``OUT/cells/<cell>/config.yaml`` (so
``robustft fit --config OUT/cells/<cell>/config.yaml`` reruns it by hand), its log directory is that folder, and the
model, data module and trainer are built by the same `RobustFTCLI` (`lightning_robustft.cli`) as ``robustft fit``.
After fit, the cell's WiSE-FT curve is evaluated (no training) and ``result.json`` is written last, atomically: a cell
is finished exactly when that file exists, so a rerun with the same ``OUT`` skips it and a cell killed midway runs
again from scratch. Each ``result.json`` records a fingerprint of the cell's config; a rerun whose config differs is
refused before any training, since its results would mix two grids.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_robustft.compare.presets import SOUP, Method, Preset, check_preset, import_class
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.evaluation import cache_batches, evaluate_accuracy, named_dataloaders, resolve_id_set
from lightning_robustft.ops.interpolate import float_state_snapshot
from lightning_robustft.weight_space import DEFAULT_ALPHAS, apply_alpha, greedy_soup

__all__ = [
    "CONFIG",
    "ERROR",
    "RESULT",
    "WEIGHTS",
    "Cell",
    "Grid",
    "check_grid",
    "is_finished",
    "load_base_config",
    "load_results",
    "run_cell",
    "run_cells",
    "shard_cells",
]

RESULT = "result.json"
ERROR = "error.txt"
CONFIG = "config.yaml"
WEIGHTS = "weights.pt"
_DIGITS = 6
_SIGTERM_STATUS = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM
_PROBE_FRACTION = 0.3  # LP-FT's probe, as a share of max_epochs, when a preset does not say


@dataclass(frozen=True)
class Cell:
    """One unit of work: a trained (method, lr, seed), or the greedy soup of a seed (``lr`` is ``None``)."""

    method: str
    seed: int
    lr: float | None = None

    @property
    def key(self) -> str:
        """The cell's folder name under ``OUT/cells``, e.g. ``gmixout-lr0.0003-seed1``."""
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.method}{lr}-seed{self.seed}"


@dataclass
class Grid:
    """Everything ``robustft compare`` needs to run and summarise one grid (see `compare`).

    Attributes:
        config: the base config (parsed YAML, with ``--set`` overrides applied).
        config_path: where it came from.
        methods: the compared methods.
        presets: every known preset by name.
        seeds: the seeds.
        lrs: the learning rates (``None``: the base config's own), each scaled by the preset's ``lr_scale``.
        out: the output folder.
        baseline: the presets whose WiSE-FT curves form the frontier.
        alphas: the WiSE-FT curve's coefficients (0, 1 and ``wiseft_alpha`` always included).
        wiseft_alpha: the coefficient of the ``+wiseft`` methods.
        eval_batches: evaluate at most this many batches of each set on the curve (``None``: whole sets).
        method_lrs: ``{preset: rates}``: the presets that train at their own rates instead of ``lrs`` (taken as
            given, not scaled), e.g. the frontier's ``ft`` at more rates than the methods, or a sweep at one rate.
    """

    config: dict[str, Any]
    config_path: Path
    methods: list[Method]
    presets: Mapping[str, Preset]
    seeds: list[int]
    lrs: list[float] | None
    out: Path
    baseline: list[str]
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    wiseft_alpha: float = 0.5
    eval_batches: int | None = None
    method_lrs: Mapping[str, list[float]] = field(default_factory=dict)

    @property
    def trained(self) -> list[str]:
        """The presets that are trained: the baseline's, then the methods', in order, each once."""
        needed = [*self.baseline, *(m.trained for m in self.methods if m.trained is not None)]
        if any(m.name == SOUP for m in self.methods):
            needed.append("ft")
        return list(dict.fromkeys(needed))

    @property
    def wants_soup(self) -> bool:
        """Whether the greedy soup is compared (then the ``ft`` cells keep their final weights)."""
        return any(m.name == SOUP for m in self.methods)

    def cells(self) -> list[Cell]:
        """Every cell, seed by seed (a half-run grid has whole seeds); a seed's soup after its ``ft`` cells."""
        cells = []
        for seed in self.seeds:
            for name in self.trained:
                cells += [Cell(name, seed, lr) for lr in self.rates(name)]
            if self.wants_soup:
                cells.append(Cell(SOUP, seed))
        return cells

    def rates(self, preset: str) -> list[float | None]:
        """The learning rates a preset trains at: its own (``method_lrs``), else ``lrs``, else the config's."""
        return list(self.method_lrs.get(preset) or self.lrs or [None])

    def effective_lr(self, cell: Cell) -> float | None:
        """The rate a trained cell uses: its own rates as given, the grid's scaled by the preset's ``lr_scale``."""
        if cell.lr is None or cell.method in self.method_lrs:
            return cell.lr
        return cell.lr * self.presets[cell.method].lr_scale

    def cell_dir(self, cell: Cell) -> Path:
        """``OUT/cells/<cell key>``."""
        return self.out / "cells" / cell.key

    def cell_config(self, cell: Cell) -> dict[str, Any]:
        """The cell's full config: the base config with the seed, the learning rate and the preset applied."""
        preset = self.presets["ft" if cell.method == SOUP else cell.method]
        config = copy.deepcopy(self.config)
        config["seed_everything"] = cell.seed
        data_args = (config.get("data") or {}).get("init_args")
        if isinstance(data_args, dict) and "seed" in data_args:  # each seed redraws the data module's splits
            data_args["seed"] = cell.seed
        model_args = config["model"].setdefault("init_args", {})
        model_args.update(copy.deepcopy(dict(preset.model)))
        lr = None if cell.method == SOUP else self.effective_lr(cell)
        if lr is not None:
            _set_lr(model_args, lr)
        trainer = config.setdefault("trainer", {})
        trainer["default_root_dir"] = str(self.cell_dir(cell))
        trainer["enable_progress_bar"] = False
        callbacks = trainer.get("callbacks") or []
        callbacks = [callbacks] if isinstance(callbacks, Mapping) else list(callbacks)
        if cell.method != SOUP:
            callbacks += [_fill_probe_epochs(spec, trainer.get("max_epochs")) for spec in preset.callbacks]
        trainer["callbacks"] = callbacks
        return config

    def fingerprint(self, cell: Cell) -> str:
        """A hash of what determines the cell's result (its config, the alphas, the soup's ingredients)."""
        config = self.cell_config(cell)
        del config["trainer"]["default_root_dir"]  # the folder may move; what it holds does not change
        what: dict[str, Any] = {"config": config, "alphas": self.alphas, "eval_batches": self.eval_batches}
        if cell.method == SOUP:
            what["ingredients"] = [Cell("ft", cell.seed, lr).key for lr in self.rates("ft")]
        else:
            what["start"] = self.presets[cell.method].start
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set_lr(model_args: dict[str, Any], lr: float) -> None:
    """Put ``lr`` where the base config takes it: its optimizer's ``init_args.lr`` if it names one, else ``lr``."""
    optimizer = model_args.get("optimizer")
    if isinstance(optimizer, str):  # a bare class path
        optimizer = model_args["optimizer"] = {"class_path": optimizer}
    if isinstance(optimizer, dict):
        init_args = optimizer.get("init_args")
        if not isinstance(init_args, dict):
            init_args = optimizer["init_args"] = {}
        init_args["lr"] = lr
    else:
        model_args["lr"] = lr


def _fill_probe_epochs(spec: Mapping[str, Any], max_epochs: Any) -> dict[str, Any]:
    """A copy of a callback spec; an ``LPFTCallback`` without ``probe_epochs`` probes 30% of ``max_epochs``."""
    filled = copy.deepcopy(dict(spec))
    if str(filled["class_path"]).endswith("LPFTCallback") and isinstance(max_epochs, int) and max_epochs > 1:
        init_args = filled.setdefault("init_args", {})
        init_args.setdefault("probe_epochs", max(1, round(_PROBE_FRACTION * max_epochs)))
    return filled


def _probe_epochs(config: Mapping[str, Any]) -> int:
    for spec in config["trainer"]["callbacks"]:
        if isinstance(spec, Mapping) and "probe_epochs" in (spec.get("init_args") or {}):
            return int(spec["init_args"]["probe_epochs"])
    return 1  # LPFTCallback's default


# -------------------------------------------------------------------------------------------- checks up front
def load_base_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read the base YAML (as ``robustft fit`` takes it) and apply ``{"dotted.key": value}`` overrides.

    Raises:
        RobustFTConfigError: a missing file, or a config without ``model.class_path`` / ``data.class_path``.
    """
    file = Path(path)
    if not file.is_file():
        raise RobustFTConfigError(f"--config {str(file)!r} does not exist or is not a file.")
    config = yaml.safe_load(file.read_text()) or {}
    if not isinstance(config, dict):
        raise RobustFTConfigError(f"{str(file)!r} is not a YAML mapping (the file `robustft fit --config` takes).")
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RobustFTConfigError(f"--set {key}: {part!r} is not a mapping in {str(file)!r}.")
        node[leaf] = value
    for section in ("model", "data"):
        if not isinstance(config.get(section), dict) or "class_path" not in config[section]:
            raise RobustFTConfigError(
                f"{str(file)!r} has no `{section}.class_path`: compare runs `robustft fit` on it, so name the "
                f"{section} class as that config does, e.g. `{section}: {{class_path: ..., init_args: {{...}}}}`."
            )
    return config


def check_grid(grid: Grid) -> None:
    """Everything that can be checked before training: presets, learning rates, seeds, alphas, old results.

    Raises:
        RobustFTConfigError: with what was wrong and how to fix it.
    """
    model_class = import_class(grid.config["model"]["class_path"], "model.class_path")
    for name in grid.trained:
        check_preset(grid.presets[name], model_class)
    _check_rates("--lrs", grid.lrs)
    for name, rates in grid.method_lrs.items():
        if name not in grid.trained:
            raise RobustFTConfigError(
                f"--method-lrs names {name!r}, which this grid does not train; its trained methods are {grid.trained}."
            )
        _check_rates(f"--method-lrs {name}", rates)
        if not rates:
            raise RobustFTConfigError(f"--method-lrs {name}: give at least one rate, e.g. {name}=1e-3.")
    if not grid.seeds or len(set(grid.seeds)) != len(grid.seeds):
        raise RobustFTConfigError(f"--seeds {grid.seeds}: give distinct integer seeds, e.g. `--seeds 0 1 2`.")
    if "ft" not in grid.baseline:
        raise RobustFTConfigError("The baseline must include `ft` (full fine-tuning): differences are taken to it.")
    unknown = [name for name in grid.baseline if name not in grid.presets]
    if unknown:
        raise RobustFTConfigError(f"--baseline {unknown}: not presets; known: {list(grid.presets)}.")
    for alpha in [*grid.alphas, grid.wiseft_alpha]:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise RobustFTConfigError(f"alpha {alpha!r} must be a number in [0, 1] (0: the start, 1: the method).")
    # wiseft_alpha always: adding a `+wiseft` method to a finished grid later then needs no new cell
    grid.alphas = sorted({0.0, 1.0, float(grid.wiseft_alpha), *map(float, grid.alphas)})
    if grid.eval_batches is not None and (not isinstance(grid.eval_batches, int) or grid.eval_batches < 1):
        raise RobustFTConfigError(f"eval_batches={grid.eval_batches!r}: give an integer >= 1, or None (whole sets).")
    if grid.lrs is not None or grid.method_lrs:
        model_args = grid.config["model"].get("init_args") or {}
        if not isinstance(model_args.get("optimizer"), (dict, str)) and "lr" not in _parameters(model_class):
            raise RobustFTConfigError(
                f"--lrs given, but {model_class.__name__} takes no `lr` and the config names no optimizer with "
                "`init_args.lr`: say where the learning rate goes, or leave out --lrs."
            )
    for cell in grid.cells():
        result = grid.cell_dir(cell) / RESULT
        if result.is_file() and json.loads(result.read_text()).get("fingerprint") != grid.fingerprint(cell):
            raise RobustFTConfigError(
                f"{result} was written by a different grid (another base config, preset, alphas or soup): results "
                f"would mix two experiments. Use a new --out, or delete {grid.cell_dir(cell)} to rerun that cell."
            )


def _check_rates(option: str, rates: Sequence[Any] | None) -> None:
    for lr in rates or []:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise RobustFTConfigError(f"{option}: {lr!r} is not a learning rate (a finite number > 0).")
    if rates is not None and len(set(rates)) != len(rates):
        raise RobustFTConfigError(f"{option} {list(rates)} repeats a value.")


def _parameters(cls: type) -> list[str]:
    return list(inspect.signature(cls).parameters)


# ------------------------------------------------------------------------------------------------ running
def shard_cells(cells: Sequence[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Every N-th cell from the i-th (``shard=(i, N)``, ``0 <= i < N``); all cells for ``None``."""
    if shard is None:
        return list(cells)
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise RobustFTConfigError(f"--shard {index}/{count}: give i/N with N >= 1 and 0 <= i < N (e.g. 0/4).")
    return list(cells[index::count])


def is_finished(grid: Grid, cell: Cell) -> bool:
    """Whether the cell's ``result.json`` exists (written last, so the cell completed)."""
    return (grid.cell_dir(cell) / RESULT).is_file()


def run_cells(
    grid: Grid, cells: Sequence[Cell], *, derived_only: bool = False, echo: Callable[[str], None] = print
) -> dict[str, list[str]]:
    """Run the unfinished ``cells`` in order; report progress; a failed cell is reported and the rest go on.

    Args:
        grid: the grid.
        cells: the cells to run (a shard's).
        derived_only: run only the soups (evaluation only; used by ``--summarize``).
        echo: where progress lines go.

    Returns:
        ``{"ran": [...], "skipped": [...], "failed": [...], "waiting": [...]}`` by cell key; ``waiting`` are soups
        whose ``ft`` cells are not all finished (another shard may still run them).
    """
    report: dict[str, list[str]] = {"ran": [], "skipped": [], "failed": [], "waiting": []}
    todo = [c for c in cells if not is_finished(grid, c) and (not derived_only or c.method == SOUP)]
    report["skipped"] = [c.key for c in cells if is_finished(grid, c)]
    total, done = len(cells), len(cells) - len(todo)
    durations: list[float] = []
    if report["skipped"]:
        echo(f"compare: {len(report['skipped'])} of {total} cells already finished in {grid.out}; skipping them.")
    for position, cell in enumerate(todo):
        if cell.method == SOUP and not all(is_finished(grid, c) for c in _soup_ingredients(grid, cell)):
            report["waiting"].append(cell.key)
            echo(f"compare: {cell.key} waits for its ft cells (another shard?); `--summarize` will make it.")
            continue
        start = time.perf_counter()
        try:
            result = run_cell(grid, cell)
        except SIGTERMException:  # the job is being stopped (a preempted GPU, a SLURM time limit): stop the grid
            echo(f"compare: SIGTERM during {cell.key}; stopping. Rerun the same command to resume from that cell.")
            raise SystemExit(_SIGTERM_STATUS) from None
        except Exception as error:
            grid.cell_dir(cell).mkdir(parents=True, exist_ok=True)
            (grid.cell_dir(cell) / ERROR).write_text(traceback.format_exc())
            report["failed"].append(cell.key)
            echo(f"compare: {cell.key} FAILED ({type(error).__name__}: {error}); see {grid.cell_dir(cell) / ERROR}")
            continue
        durations.append(time.perf_counter() - start)
        done += 1
        report["ran"].append(cell.key)
        remaining = len(todo) - position - 1
        eta = statistics.fmean(durations) * remaining
        end = result["curve"][-1]
        id_text = f"ID test {100 * end['id_test']:.1f}" if "id_test" in end else f"ID val {100 * end['id_val']:.1f}"
        echo(
            f"[{done}/{total}] {cell.key}: {id_text}, OOD avg {100 * end['ood_avg']:.1f} "
            f"({durations[-1]:.0f} s; ETA {_minutes(eta)})"
        )
    return report


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _soup_ingredients(grid: Grid, soup: Cell) -> list[Cell]:
    return [Cell("ft", soup.seed, lr) for lr in grid.rates("ft")]


def run_cell(grid: Grid, cell: Cell) -> dict[str, Any]:
    """Run one cell from scratch (a killed cell's leftovers are removed first); write and return its result."""
    folder = grid.cell_dir(cell)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = grid.cell_config(cell)
    config_file = folder / CONFIG
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    if cell.method == SOUP:
        curve, extra = _run_soup(grid, cell, config_file)
    else:
        curve, extra = _run_trained(grid, cell, config_file, config)
    result = {
        "cell": cell.key,
        "method": cell.method,
        "seed": cell.seed,
        "lr": cell.lr,
        "hparams": _hparams(grid, cell),
        "settings": _settings(grid, cell),
        "fingerprint": grid.fingerprint(cell),
        "seconds": round(time.perf_counter() - start, 1),
        **extra,
        "curve": curve,
    }
    temporary = folder / (RESULT + ".tmp")
    temporary.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(temporary, folder / RESULT)
    return result


def _hparams(grid: Grid, cell: Cell) -> dict[str, Any]:
    """The cell's searched hyperparameters (the learning rate it trained at)."""
    lr = None if cell.method == SOUP else grid.effective_lr(cell)
    return {} if lr is None else {"lr": lr}


def _settings(grid: Grid, cell: Cell) -> str:
    """The method's fixed settings, in words."""
    if cell.method == SOUP:
        return "greedy soup of the ft runs at every lr, chosen on ID val"
    return grid.presets[cell.method].description


def _build(config_file: Path) -> Any:
    """The model, data module and trainer of ``robustft fit --config config_file`` (LightningCLI, not run).

    jsonargparse reports a config it cannot parse by printing to stderr and exiting; that message becomes the
    cell's error instead, so the grid goes on and the message lands in the cell's ``error.txt``.
    """
    from lightning_robustft.cli import cli_main

    stderr = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # argv is `robustft compare`
            return cli_main(["--config", str(config_file)], run=False)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()
        raise RobustFTConfigError(f"{config_file} does not parse: {' '.join(message[-3:])}") from None
    finally:
        sys.stderr.write(stderr.getvalue())  # warnings and messages still reach the user


class _ProbeSnapshot(Callback):
    """Keeps the weights at the end of LP-FT's probe: the start of LP-FT's WiSE-FT curve (the WiSE-FT paper)."""

    def __init__(self, probe_epochs: int) -> None:
        self.probe_epochs = probe_epochs
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Snapshot after the last probe epoch."""
        if trainer.current_epoch == self.probe_epochs - 1:
            self.state = float_state_snapshot(pl_module.state_dict())


def _run_trained(
    grid: Grid, cell: Cell, config_file: Path, config: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cli = _build(config_file)
    model, trainer, datamodule = cli.model, cli.trainer, cli.datamodule
    theta_0 = float_state_snapshot(model.state_dict())
    probe = None
    if grid.presets[cell.method].start == "probe":
        probe = _ProbeSnapshot(_probe_epochs(config))
        trainer.callbacks.append(probe)
    trainer.fit(model, datamodule=datamodule)
    theta_1 = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    if cell.method == "ft" and grid.wants_soup:
        torch.save(theta_1, grid.cell_dir(cell) / WEIGHTS)
    start = theta_0
    extra: dict[str, Any] = {"start": "init"}
    if probe is not None:
        if probe.state is None:
            raise RobustFTConfigError(
                f"{cell.key}: the fit ended before LP-FT's probe ({probe.probe_epochs} epochs) did; raise max_epochs."
            )
        start, extra = probe.state, {"start": "probe"}
    evaluation = _evaluation_sets(model, datamodule)
    curve = _curve(model, trainer, start, theta_1, evaluation, grid.alphas, grid.eval_batches)
    return curve, {**extra, "id_set": evaluation.id_set}


def _run_soup(grid: Grid, cell: Cell, config_file: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    ingredients = _soup_ingredients(grid, cell)
    files = [grid.cell_dir(c) / WEIGHTS for c in ingredients]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise RobustFTConfigError(
            f"{cell.key}: no final weights in {missing} (those ft cells ran in a grid without greedy_soup). Delete "
            "their folders so they rerun and keep their weights."
        )
    cli = _build(config_file)
    model, trainer, datamodule = cli.model, cli.trainer, cli.datamodule
    theta_0 = float_state_snapshot(model.state_dict())
    trainer.validate(model, datamodule=datamodule, verbose=False)  # sets the data module up as fit would
    evaluation = _evaluation_sets(model, datamodule)
    device = trainer.strategy.root_device
    # Chosen on the ID validation set only: greedy_soup is handed no other loader.
    soup = greedy_soup(
        model, [str(f) for f in files], {evaluation.id_set: evaluation.val[evaluation.id_set]}, device=device
    )
    extra = {
        "start": "init",
        "id_set": evaluation.id_set,
        "soup": [ingredients[index].key for index in soup.ingredients],
    }
    return _curve(model, trainer, theta_0, soup.state_dict, evaluation, grid.alphas, grid.eval_batches), extra


@dataclass
class _EvaluationSets:
    val: dict[str, Iterable[Any]]
    id_set: str
    id_test: Iterable[Any] | None


def _evaluation_sets(model: Any, datamodule: Any) -> _EvaluationSets:
    """The validation sets by name, the ID one, and the ID test set when the data module has one of that name."""
    if datamodule is None:
        raise RobustFTConfigError("compare needs a data module in the config (`data: {class_path: ...}`).")
    val = named_dataloaders(datamodule.val_dataloader(), getattr(model, "val_set_names", None))
    id_set = resolve_id_set(list(val), getattr(model, "id_set", None) or getattr(datamodule, "id_set", None))
    if len(val) < 2:
        raise RobustFTConfigError(
            f"The config's only validation set is {id_set!r}: compare needs at least one OOD validation set."
        )
    id_test = None
    names = getattr(datamodule, "test_set_names", None)
    if (names is None and is_overridden("test_dataloader", datamodule)) or (names and id_set in names):
        datamodule.setup("test")
        tests = named_dataloaders(datamodule.test_dataloader(), names)
        id_test = tests.get(id_set)
    return _EvaluationSets(val, id_set, id_test)


def _curve(
    model: Any,
    trainer: Trainer,
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, Any],
    sets: _EvaluationSets,
    alphas: Sequence[float],
    eval_batches: int | None,
) -> list[dict[str, Any]]:
    """The WiSE-FT curve from ``start`` to ``end``: per alpha, every validation set, the OOD average, the ID test."""
    device = trainer.strategy.root_device
    limit = dict.fromkeys(sets.val, eval_batches)
    context = trainer.precision_plugin.forward_context
    model.to(device)
    val = cache_batches(sets.val, limit)
    id_test = None if sets.id_test is None else cache_batches({sets.id_set: sets.id_test}, limit)
    rows = []
    for alpha in alphas:
        apply_alpha(model, start, end, alpha)
        accuracy = evaluate_accuracy(model, val, device=device, max_batches=limit, forward_context=context)
        ood = [value for name, value in accuracy.items() if name != sets.id_set]
        row: dict[str, Any] = {
            "alpha": alpha,
            "id_val": round(accuracy[sets.id_set], _DIGITS),
            "ood_avg": round(sum(ood) / len(ood), _DIGITS),
        }
        if id_test is not None:
            test = evaluate_accuracy(model, id_test, device=device, max_batches=limit, forward_context=context)
            row["id_test"] = round(test[sets.id_set], _DIGITS)
        row["sets"] = {name: round(value, _DIGITS) for name, value in accuracy.items()}
        rows.append(row)
    model.load_state_dict(dict(end))
    return rows


def load_results(grid: Grid) -> list[dict[str, Any]]:
    """The finished cells of the grid (any shard's), in grid order."""
    return [json.loads((grid.cell_dir(c) / RESULT).read_text()) for c in grid.cells() if is_finished(grid, c)]
