"""The ``robustft`` console script: the Trainer subcommands, ``robustft compare``, and errors a user can act on.

``robustft fit|validate|test|predict`` run the LightningCLI of `lightning_robustft.cli`; ``robustft compare`` runs
a grid of those fits (`lightning_robustft.compare`). It sits above both because ``compare`` builds every cell with
the same LightningCLI, so the dispatch cannot live in ``cli.py`` without an import cycle.

A configuration mistake found while the objects are built (a bad backbone, a missing folder, an unknown metric)
ends the command with one ``robustft: error: ...`` line on stderr and exit status 1, not a 30-frame traceback;
``ROBUSTFT_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_robustft.cli import cli_main
from lightning_robustft.compare.cli import compare_main

__all__ = ["TRACEBACK_ENV", "find_user_error", "main"]

#: Set to ``1`` to see the full traceback of an error that ``robustft`` would otherwise print as one line.
TRACEBACK_ENV = "ROBUSTFT_TRACEBACK"

#: Built-in errors that are a user's mistake when this package raises them (elsewhere they are bugs: traceback).
_USER_ERROR_TYPES = (ValueError, TypeError, FileNotFoundError, ImportError)
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def find_user_error(error: BaseException) -> BaseException | None:
    """The configuration mistake behind ``error``, or ``None`` when it is a bug (which keeps its traceback).

    jsonargparse wraps an error raised while it builds a class in its own ``ValueError``, so the chain of causes is
    searched. Configuration errors (this package's and Lightning's ``MisconfigurationException``) always count; a
    ``ValueError``, ``TypeError``, ``FileNotFoundError`` or ``ImportError`` counts when this package raised it (its
    messages say what to fix), not when it comes from deep inside a library.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MisconfigurationException):
            return current
        if isinstance(current, _USER_ERROR_TYPES):
            frames = traceback.extract_tb(current.__traceback__)
            if frames and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE_DIR):
                return current
        current = current.__cause__ or current.__context__
    return None


def main() -> None:
    """Console-script entry point: exit status 0 on success, 1 with a one-line message on a configuration error."""
    try:
        if sys.argv[1:2] == ["compare"]:  # not a Trainer subcommand: a grid of fits
            compare_main(sys.argv[2:])
        else:
            cli_main()
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None or os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
            raise
        print(f"robustft: error: {user_error}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
