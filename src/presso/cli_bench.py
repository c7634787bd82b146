"""CLI commands of the bench verbs, registered on the main Typer app by ``presso.cli``.

Helpers (_run, _emit, option types) come from ``presso.cli``; nothing heavy is imported at module level.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
