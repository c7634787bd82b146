"""The ``presso`` command line: one thin command per verb over the Python API.

``app`` (in ``presso.cli.app``) holds the Typer app and what every command shares; each verb family lives in its own
module and adds its commands to that app when imported. Nothing here imports torch at module level, so
``presso --help`` stays instant.
"""

from __future__ import annotations

from presso.cli.app import app

# Importing a verb module registers its commands; this order is the order ``presso --help`` lists them in.
# isort: off
from presso.cli import compress, train, info, convert, bench, db, search, run  # noqa: E402, F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    import sys

    try:
        app()
    except KeyboardInterrupt:  # while Typer builds the command line, before any command runs
        sys.stderr.write("interrupted\n")
        sys.exit(130)
