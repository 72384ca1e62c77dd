"""Every code block of README.md and docs/*.md runs: Python blocks execute, YAML blocks parse with the CLI's parser,
bash blocks run in a shell; a YAML block starting with ``# configs/compare_presets.yaml`` is a
``robustft compare --presets`` file, loaded and every preset built as before a grid.

Sybil finds the blocks and the skip markers. A block that cannot run here is preceded in the Markdown by
``<!-- skip: next "why" -->``; the reason shows in pytest's skip report. Skipped are only blocks that need a GPU, a
download or data the project does not have (ImageNet, DomainNet), that install the package, and bash blocks of
several ``robustft`` runs: each is a process of its own, 15 s or more even shortened, too slow for ``make test``
(the same code paths run in-process through the pages' Python blocks and ``tests/test_cli.py``).

The blocks of one file run in order in one namespace, which starts with the package's public names
(``from lightning_robustft import *``), ``torch`` and ``Path``, in a scratch directory that links to the repository's
``configs/`` and ``scripts/``. Python blocks run as written, with one change that keeps the test fast: every
``lightning.pytorch.Trainer`` a block makes (``Trainer``, ``L.Trainer``) gets two training batches per epoch, one
batch per evaluation set, no sanity check and no progress bar (``SHORT_TRAINER``) unless the block sets them, and at
most ``MAX_EPOCHS`` epochs. Every hook of every callback still runs, over fewer batches; logs and checkpoints
go to the scratch directory (the working directory, Lightning's default root).
Bash blocks run each in a fresh shell, where ``robustft fit|validate|test|predict`` get the same short trainer
flags, one epoch at most, unless the line sets them. A YAML block is a config or a fragment of one: it is layered on top
of ``configs/demo.yaml`` (so a fragment that sets only callbacks is checked too) and parsed by ``robustft fit
--print_config``. Each block is one test, named ``<file>:<line>``, so a failure says where the block is.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import SkipTest

import pytest
import yaml
from lightning.pytorch import Trainer
from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

from lightning_robustft.cli import cli_main
from lightning_robustft.compare.presets import check_preset, load_presets
from lightning_robustft.models.classifier import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BASE_CONFIG = ROOT / "configs" / "demo.yaml"
#: The top-level keys of a ``robustft`` config (``LightningCLI``'s ``fit`` subcommand).
CONFIG_KEYS = {"seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path"}
#: Values for the environment variables that the docs' configs interpolate with ``${oc.env:...}``.
DOC_ENVIRONMENT = {
    "DATA": "/data/example",
    "DOMAINNET_ROOT": "/data/domainnet",
    "IMAGENET_ROOT": "/data/imagenet",
    "WILDS_ROOT": "/data/wilds",
}
SHELL_TIMEOUT_S = 120
#: Run before each bash block: ``robustft fit|validate|test|predict`` get the short trainer flags the line lacks.
SHORT_ROBUSTFT = """
robustft() {
  local extra=() flag
  case "$1" in fit|validate|test|predict)
    for flag in limit_train_batches=2 limit_val_batches=1 limit_test_batches=1 limit_predict_batches=1 \\
        num_sanity_val_steps=0 max_epochs=1 enable_progress_bar=false; do
      [[ " $* " == *" --trainer.${flag%%=*}"* ]] || extra+=("--trainer.$flag")
    done;;
  esac
  command robustft "$@" "${extra[@]}"
}
"""
#: Trainer arguments that a Python block gets unless it sets them: a fit of a few batches instead of minutes.
SHORT_TRAINER = {
    "limit_train_batches": 2,
    "limit_val_batches": 1,
    "limit_test_batches": 1,
    "limit_predict_batches": 1,
    "num_sanity_val_steps": 0,
    "enable_progress_bar": False,
}
#: The most epochs a block's Trainer runs (2: LP-FT's probe epoch and one of fine-tuning).
MAX_EPOCHS = 2


#: The first line of a YAML block that is a `robustft compare --presets` file rather than a config.
PRESETS_MARK = "# configs/compare_presets.yaml"


def check_presets(example: Example) -> None:
    """A presets block loads as `robustft compare --presets` loads it, and every preset builds (as before a grid)."""
    path = Path.cwd() / f"presets_{example.line}.yaml"
    path.write_text(example.parsed)
    presets = load_presets(path)
    for name in yaml.safe_load(example.parsed):
        check_preset(presets[name], ImageClassifier)


def check_yaml(example: Example) -> None:
    """A YAML block parses as YAML and, on top of the demo config, through the CLI's parser."""
    config = yaml.safe_load(example.parsed)
    if example.parsed.startswith(PRESETS_MARK):
        check_presets(example)
        return
    if not isinstance(config, dict) or not set(config) <= CONFIG_KEYS:
        keys = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise AssertionError(
            f"not a robustft config: top-level keys {keys}, expected some of {sorted(CONFIG_KEYS)}; nest a fragment "
            "under the key it belongs to (e.g. data: init_args: ...)"
        )
    path = Path.cwd() / f"block_{example.line}.yaml"
    path.write_text(example.parsed)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
            cli_main(["fit", "--config", str(BASE_CONFIG), "--config", str(path), "--print_config"])
    except SystemExit as done:
        if done.code != 0:
            raise AssertionError(f"the CLI's parser rejects it: {errors.getvalue()[-3000:]}") from None
        return
    raise AssertionError("--print_config did not exit")


def run_shell(example: Example) -> None:
    """A bash block runs with ``-e``, in the scratch directory, with the package's ``robustft`` first on the PATH.

    Its ``robustft`` training and evaluation lines get the short trainer flags that they do not set
    (``SHORT_ROBUSTFT``, appended after the line's own configs, so a ``--trainer.max_epochs 3`` of the block wins).
    """
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        **DOC_ENVIRONMENT,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", SHORT_ROBUSTFT + example.parsed],
        capture_output=True,
        text=True,
        env=env,
        timeout=SHELL_TIMEOUT_S,
    )
    if done.returncode != 0:
        raise AssertionError(f"exit status {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


SYBIL = Sybil(
    parsers=[
        PythonCodeBlockParser(),
        CodeBlockParser(language="yaml", evaluator=check_yaml),
        CodeBlockParser(language="bash", evaluator=run_shell),
        SkipParser(),
    ],
)
DOCUMENTS = {path: SYBIL.parse(path) for path in DOC_FILES}
EXAMPLES = {path: list(document) for path, document in DOCUMENTS.items()}
CASES = [
    pytest.param(path, index, id=f"{path.relative_to(ROOT)}:{example.line}")
    for path, examples in EXAMPLES.items()
    for index, example in enumerate(examples)
    if isinstance(example.parsed, str)  # a code block (the skip markers are examples too, run in order)
]
#: Per file, the outcome of each block evaluated so far (``None``: it ran), so blocks run once and in order.
OUTCOMES: dict[Path, list[BaseException | None]] = defaultdict(list)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory for the blocks' outputs, with links to the repository's configs and scripts."""
    directory = tmp_path_factory.mktemp("docs")
    for name in ("configs", "scripts"):
        (directory / name).symlink_to(ROOT / name)
    return directory


def start_namespace(namespace: dict) -> None:
    """What every file's blocks may use without importing it."""
    exec("import torch\nfrom pathlib import Path\nfrom lightning_robustft import *", namespace)


def outcome(path: Path, index: int) -> BaseException | None:
    """Evaluate the file's blocks up to ``index`` (those not yet run, in order); the outcome of block ``index``."""
    done = OUTCOMES[path]
    examples = EXAMPLES[path]
    if not done:
        start_namespace(DOCUMENTS[path].namespace)
    while len(done) <= index:
        try:
            examples[len(done)].evaluate()
        except Exception as error:  # SkipTest included: the block's outcome, reported by its own test
            done.append(error)
        else:
            done.append(None)
    return done[index]


def shorten_trainers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``Trainer`` made while the blocks run gets ``SHORT_TRAINER`` and at most ``MAX_EPOCHS`` epochs."""
    build = Trainer.__init__

    @functools.wraps(build)
    def short_init(self: Trainer, *args: Any, **kwargs: Any) -> None:
        kwargs = {**SHORT_TRAINER, **kwargs}
        if kwargs.get("max_epochs") is None or not 0 <= kwargs["max_epochs"] <= MAX_EPOCHS:
            kwargs["max_epochs"] = MAX_EPOCHS
        build(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", short_init)


@pytest.mark.parametrize(("path", "index"), CASES)
def test_doc_block(path: Path, index: int, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(scratch)
    shorten_trainers(monkeypatch)
    monkeypatch.setattr("sys.argv", ["robustft"])  # LightningCLI warns about pytest's own arguments
    for name, value in DOC_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    error = outcome(path, index)
    if isinstance(error, SkipTest):
        pytest.skip(f"{path.relative_to(ROOT)}:{EXAMPLES[path][index].line}: {error}")
    if error is not None:
        where = f"{path.relative_to(ROOT)}:{EXAMPLES[path][index].line}"
        raise AssertionError(f"the code block at {where} fails: {type(error).__name__}: {error}") from error


def test_blocks_are_found_in_every_form() -> None:
    # Fenced at the margin or indented in a list item, each language goes to its evaluator: a change in the Markdown
    # or in sybil must not silently drop blocks from the test.
    languages = {
        (path.name, example.region.lexemes["arguments"])
        for path, examples in EXAMPLES.items()
        for example in examples
        if isinstance(example.parsed, str)
    }
    assert {("cli.md", "bash"), ("cli.md", "yaml"), ("README.md", "python"), ("demo.md", "python")} <= languages
    indented = [
        example
        for example in EXAMPLES[ROOT / "docs" / "cli.md"]
        if isinstance(example.parsed, str) and "--trainer.callbacks+=" in example.parsed
    ]
    assert len(indented) == 1 and indented[0].region.evaluator is run_shell
