"""What ``presso ... --help`` shows: options in named panels, in one order, with readable value placeholders.

A command puts an option in a panel with ``rich_help_panel=`` one of the names below (the same names in every verb);
``PressoApp``, the root group's class, sorts each command's options by panel and gives every option a metavar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from presso.cli.limits import PressoGroup

# the help panels options are grouped in, the same names in every verb
MODEL, DATA, PRUNE, DECOMPOSE, TARGET, EXPORT, INT8, MEASURE, OUTPUT = (
    "Model", "Data", "Prune", "Decompose", "Target", "Export", "INT8", "Measure", "Output",
)  # fmt: skip

PANELS = (MODEL, DATA, PRUNE, DECOMPOSE, TARGET, EXPORT, INT8, MEASURE, OUTPUT)  # the order --help shows them in
# a readable placeholder for an option's value where its declaration gives none (instead of "<float>", "<path>")
_METAVARS = {int: "N", float: "NUMBER", str: "TEXT"}


def readable_help(command: Any) -> None:
    """``command`` and every command under it: options in their panels' order (``PANELS``; the ungrouped first),
    and a readable metavar for every option and argument: flags none, numbers ``N``/``NUMBER``, paths ``PATH``,
    text ``TEXT``, arguments their name in capitals -- unless the declaration names one."""
    for sub in getattr(command, "commands", {}).values():
        readable_help(sub)
    rank = {name: i + 1 for i, name in enumerate(PANELS)}
    command.params.sort(key=lambda p: -1 if p.param_type_name == "argument" else rank.get(p.rich_help_panel, 0))
    for param in command.params:
        if param.param_type_name == "argument":
            param.display_type_rich = lambda ctx: None  # the metavar says it; no "<str>" beside it
        if param.metavar is not None:
            continue
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
            continue
        if param.param_type_name == "argument":
            param.metavar = param.name.upper()
            continue
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        inner = next(iter(getattr(annotation, "__args__", ())), annotation)  # list[str] -> str
        if isinstance(inner, type) and issubclass(inner, Path):
            param.metavar = "PATH"
        elif inner in _METAVARS:
            param.metavar = _METAVARS[inner]
    original = command.get_help_option

    def get_help_option(ctx):  # --help is made on demand: a flag, shown without "<bool>"
        option = original(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option


class PressoApp(PressoGroup):
    """The root group: numeric options range-checked (``PressoGroup``) and readable metavars everywhere."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        readable_help(self)
