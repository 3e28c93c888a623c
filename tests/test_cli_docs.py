"""docs/cli.md matches the commands; --help shows flags without a value type."""

import pytest
from typer.testing import CliRunner

from metacompress.cli.docs import DOC, markdown
from metacompress.cli.introspect import commands
from metacompress.cli.main import app

PATHS = [path for path, _ in commands(app)]


def test_docs_cli_md_is_up_to_date():
    assert DOC.read_text() == markdown(), "docs/cli.md is stale: run python -m metacompress.cli.docs"
    for path in PATHS:
        assert f"## `metacompress {' '.join(path)}`" in DOC.read_text()


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_help_lists_flags_without_a_value_type(path):
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "--json" in res.output and "--help" in res.output
    assert "<bool>" not in res.output
    help_line = next(ln for ln in res.output.splitlines() if "--help" in ln)
    assert "<" not in help_line
