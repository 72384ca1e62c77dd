"""The documented robustness benchmark: `robustft compare` grids on the offline demo, the results page's numbers.

    python benchmarks/frontier.py --docs docs/results        # the whole benchmark (make benchmark), ~30 min on 2 cores
    python benchmarks/frontier.py --studies outline --seeds 0 --set trainer.max_epochs=1   # a smoke run
    python benchmarks/frontier.py --summarize --docs docs/results   # the docs' files again, from finished runs

Each study of ``benchmarks/frontier.yaml`` is one ``robustft compare`` command over a demo config (both demo
settings, a start without a zero-shot head, a longer run; every method, GMixout's levers, 3 seeds). Its cells are
split in ``--jobs`` shards (``--shard i/N``) that run side by side, one CPU thread each, which on a small model uses
the cores better than one process with several threads; then ``--summarize`` merges them. A rerun skips finished
cells, as compare does.

With ``--docs DIR`` it also writes what ``docs/results.md`` shows: per study the compare summary
(``frontier_<study>.md``, ``.json``) and its ID-OOD figure (``frontier_<study>.png``), one figure per GMixout lever
(``frontier_lever_<lever>.png``), and the wall time of every study (``frontier_time.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
import yaml

from lightning_robustft.compare.presets import load_presets, resolve_methods
from lightning_robustft.compare.summary import plot_frontier

ROOT = Path(__file__).resolve().parents[1]
SPEC = Path(__file__).with_suffix(".yaml")


def compare_argv(spec: Mapping[str, Any], study: Mapping[str, Any], out: Path, seeds: Sequence[int]) -> list[str]:
    """The ``robustft compare`` arguments of one study (without ``--shard`` / ``--summarize``)."""
    argv = ["compare", "--config", study["config"], "--methods", *study["methods"], "--out", str(out)]
    argv += ["--seeds", *map(str, seeds), "--alphas", *map(str, spec["alphas"])]
    if spec.get("presets"):
        argv += ["--presets", spec["presets"]]
    if study.get("lrs"):
        argv += ["--lrs", *map(str, study["lrs"])]
    if study.get("method_lrs"):
        argv += ["--method-lrs", *(f"{k}={','.join(map(str, v))}" for k, v in study["method_lrs"].items())]
    if study.get("baseline"):
        argv += ["--baseline", *study["baseline"]]
    for key, value in (study.get("set") or {}).items():
        argv += ["--set", f"{key}={value}"]
    return argv


def run_study(argv: list[str], jobs: int, log_dir: Path, summarize_only: bool = False) -> float:
    """Run the study's shards side by side (none with ``summarize_only``), then summarise; the wall time in s."""
    command = [sys.executable, "-m", "lightning_robustft.console", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs)), "HF_HUB_OFFLINE": "1"}
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shards = []
    for index in range(0 if summarize_only else jobs):
        log = open(log_dir / f"shard{index}.log", "w")  # noqa: SIM115 - closed after the shard ends
        shard = [*command, "--shard", f"{index}/{jobs}"]
        shards.append((subprocess.Popen(shard, stdout=log, stderr=log, env=env), log))
    for process, log in shards:
        process.wait()
        log.close()
    failed = [index for index, (process, _) in enumerate(shards) if process.returncode != 0]
    if failed:
        raise SystemExit(f"shard(s) {failed} failed; see {log_dir}/shard<i>.log")
    subprocess.run([*command, "--summarize"], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def write_docs(spec: Mapping[str, Any], name: str, out: Path, docs: Path) -> None:
    """Copy the study's summary into ``docs`` and draw its figures (main methods; one per GMixout lever)."""
    study = spec["studies"][name]
    summary = json.loads((out / "summary.json").read_text())
    results = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    shutil.copyfile(out / "summary.md", docs / f"frontier_{name}.md")
    shutil.copyfile(out / "summary.json", docs / f"frontier_{name}.json")
    presets = load_presets(ROOT / spec["presets"] if spec.get("presets") else None)
    methods = resolve_methods(study["methods"], presets)
    levers = study.get("levers") or {}
    in_levers = {preset for group in levers.values() for preset in group if preset != "gmixout"}
    main = [m for m in methods if (m.trained or m.name) not in in_levers]
    plot_frontier(results, summary, main, docs / f"frontier_{name}.png")
    for lever, group in levers.items():
        chosen = [m for m in methods if m.name == "ft" or (m.name in group)]
        plot_frontier(results, summary, chosen, docs / f"frontier_lever_{lever}.png")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SPEC, help="the studies (default benchmarks/frontier.yaml)")
    parser.add_argument("--out", type=Path, default=ROOT / "robustft_logs" / "benchmark", help="compare's folders")
    parser.add_argument("--docs", type=Path, default=None, help="write the results page's files here")
    parser.add_argument("--studies", nargs="+", default=None, help="run only these studies")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="instead of the spec's seeds")
    parser.add_argument("--jobs", type=int, default=2, help="shards run side by side (default 2)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--summarize", action="store_true", help="train nothing: summarise finished studies again")
    args = parser.parse_args(argv)
    out = Path(os.path.relpath(args.out.resolve(), ROOT))  # as the studies' commands will show it
    spec = yaml.safe_load(args.spec.read_text())
    names = args.studies or list(spec["studies"])
    unknown = sorted(set(names) - set(spec["studies"]))
    if unknown:
        parser.error(f"unknown studies {unknown}; the spec has {list(spec['studies'])}")
    seeds = args.seeds or spec["seeds"]
    docs = None if args.docs is None else args.docs.resolve()
    os.chdir(ROOT)  # the spec's paths are relative to the repository
    times: dict[str, float] = {}
    for name in names:
        study = spec["studies"][name]
        argv_study = compare_argv(spec, study, out / name, seeds)
        argv_study += [item for value in args.sets for item in ("--set", value)]
        print(f"[{name}] robustft {shlex.join(argv_study)}", flush=True)
        times[name] = run_study(argv_study, args.jobs, out / name / "logs", args.summarize)
        print(f"[{name}] {times[name] / 60:.1f} min", flush=True)
        if docs is not None:
            docs.mkdir(parents=True, exist_ok=True)
            write_docs(spec, name, out / name, docs)
    if args.summarize:
        return
    total = sum(times.values())
    lines = ["| study | cells | wall time |", "| --- | --- | --- |"]
    for name, seconds in times.items():
        cells = len(list((out / name / "cells").glob("*/result.json")))
        lines.append(f"| {name} | {cells} | {seconds / 60:.1f} min |")
    lines.append(f"| **all** | | **{total / 60:.1f} min** |")
    command = shlex.join(["python", "benchmarks/frontier.py", *(sys.argv[1:] if argv is None else argv)])
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    machine += f", lightning {lightning.__version__}"
    table = "\n".join(lines) + f"\n\n`{command}`, {args.jobs} shards side by side ({machine}).\n"
    print(table)
    if docs is not None:
        (docs / "frontier_time.md").write_text(table)


if __name__ == "__main__":
    main()
