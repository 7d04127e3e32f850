"""Every entry point answers --version with the package version (exit 0), before any required argument."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import segsentry
from segsentry import cli


@pytest.mark.parametrize("entry", ["app", "export_app", "calib_app", "run_app", "bench_app", "eval_app", "serve_app"])
def test_version_on_every_entry_point(entry):
    result = CliRunner().invoke(getattr(cli, entry), ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"segsentry {segsentry.__version__}"


@pytest.mark.parametrize("command", [["run"], ["calib"], ["eval", "shift"], ["phantoms"], ["monitor"], ["serve"], ["quantize"]])
def test_version_after_a_subcommand(command):
    result = CliRunner().invoke(cli.app, [*command, "--version"])
    assert result.exit_code == 0 and result.output.strip() == f"segsentry {segsentry.__version__}"
