"""What the CLI tests share: one Typer test runner and the JSON a successful ``--json`` command prints."""

import json

from typer.testing import CliRunner

runner = CliRunner()


def ok_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)
