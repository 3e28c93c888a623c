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


@pytest.mark.integration
def test_quiet_silences_stage_notes_but_not_the_result(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "METACOMPRESS_PROGRESS"}
    args = ["compress", "mlp", "--weights", "none", "--target-macs", "0.5", "--allocation", "uniform",
            "--repair-steps", "0", "--json"]
    outputs = []
    for quiet in ([], ["--quiet"]):
        res = subprocess.run([sys.executable, "-m", "metacompress.cli.main", *quiet, *args, "--out", tmp_path / str(len(quiet))],
                             capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr
        outputs.append(res)
    assert "allocate..." in outputs[0].stderr
    assert outputs[1].stderr.strip() == ""
    assert json.loads(outputs[1].stdout)["achieved_macs_ratio"] == json.loads(outputs[0].stdout)["achieved_macs_ratio"]
