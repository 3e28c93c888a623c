"""Whole runs under faults: untrusted pickles, interrupted runs, output folders over inputs, and the
same seed giving the same model. RELIABILITY.md lists what each test keeps true."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from metacompress.cli.main import run
from metacompress.pipeline import OUTPUTS, _publish
from metacompress.signals import Interrupted, signals_deferred, signals_raise
from metacompress.zoo import build_model

MC = [sys.executable, "-m", "metacompress.cli.main"]
ENV = {**os.environ, "METACOMPRESS_PROGRESS": "0"}
COMPRESS = ["compress", "mlp", "--data", "digits", "--target-macs", "0.5", "--allocation", "uniform"]

class Payload:
    """Unpickling this runs a shell command (pickle calls what ``__reduce__`` names)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(("error", "internal error")) or "Traceback" in ln]


@pytest.fixture
def evil(tmp_path):
    """A checkpoint whose unpickling runs a shell command that creates ``marker``."""
    path, marker = tmp_path / "evil.pt", tmp_path / "marker"
    torch.save({"features.1.weight": Payload(f"touch {marker}")}, path)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("command", [
    [*COMPRESS, "--weights", "{path}", "--out", "{tmp}/o"],
    ["inspect", "mlp", "--weights", "{path}"],
    ["sweep", "mlp", "--weights", "{path}", "--budgets", "0.5", "--allocations", "uniform", "--out", "{tmp}/o"],
    ["robustify", "mlp", "--weights", "{path}", "--out", "{tmp}/o"],
    ["fuse", "mlp", "--method", "uniform", "--weights", "{path},{path}", "--out", "{tmp}/f.pt"],
    ["verify", "{tmp}/none.onnx", "--data", "digits", "--reference", "{path}"],
    ["meta-eval", "{path}"],
])
def test_malicious_pickle_refused_without_trust_pickle_and_never_runs(capsys, tmp_path, evil, tiny_onnx, command):
    """Every command that reads weights: exit 2, one line naming --trust-pickle, the payload never runs."""
    path, marker = evil
    tiny_onnx(tmp_path / "none.onnx")
    args = [a.format(path=path, tmp=tmp_path) for a in command]
    assert run(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert not marker.exists() and not (tmp_path / "o").exists()
    assert len(err) == 1 and "refusing to unpickle" in err[0] and "--trust-pickle" in err[0], err


def test_trust_pickle_does_unpickle(capsys, tmp_path, evil):
    """The control: the payload above is live, and --trust-pickle is what lets it run."""
    path, marker = evil
    assert run(["inspect", "mlp", "--weights", str(path), "--trust-pickle"]) == 2  # not a state dict
    assert marker.exists()


def test_output_folder_holding_the_inputs_is_refused(capsys, tmp_path, digits):
    weights = tmp_path / "runs" / "dense.pt"
    weights.parent.mkdir()
    torch.save(build_model("mlp", digits.input_shape, 10, digits.mean, digits.std).state_dict(), weights)
    for out in (weights.parent, tmp_path):
        assert run([*COMPRESS, "--weights", str(weights), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "holds or lies inside the input" in err, err
    assert sorted(p.name for p in weights.parent.iterdir()) == ["dense.pt"]
    (tmp_path / "file").write_text("x")
    assert run([*COMPRESS, "--weights", "none", "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_signal_while_publishing_waits_until_every_output_is_in_place(tmp_path):
    stage, out = tmp_path / "stage", tmp_path / "out"
    stage.mkdir()
    out.mkdir()
    (out / "model.int8.onnx").write_text("stale")  # from an earlier run with --quantize
    for name in OUTPUTS[:3]:
        (stage / name).write_text(name)
    with pytest.raises(Interrupted) as info, signals_raise():
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run: it must not have raised inside the block
            published = True
            _publish(stage, out, list(OUTPUTS[:3]))
        published = False
    assert info.value.exit_code == 143 and published
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS[:3])  # all or nothing; no stale int8


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_raise_interrupted_and_later_signals_wait_for_cleanup(sig, code):
    cleaned = False
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as info, signals_raise():
        try:
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler raises here
        finally:
            os.kill(os.getpid(), sig)  # a second signal during the clean-up is ignored
            time.sleep(0.05)
            cleaned = True
    assert info.value.exit_code == code and cleaned
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored: pytest lives on


# ---------------------------------------------------------------- SIGTERM during compress

# stage -> extra flags that make that stage long, and the progress note that starts it
STAGES = {
    "dense training": (["--train-epochs", "1000"], "load...", 3.0),
    "repair": (["--weights", "none", "--repair-steps", "100000"], "repair...", 1.0),
    "export": (["--weights", "none", "--repair-steps", "0"], "export...", 0.2),
}


@pytest.mark.integration
@pytest.mark.parametrize("stage", list(STAGES))
def test_sigterm_during_compress_leaves_no_partial_output(tmp_path, stage):
    flags, note, wait = STAGES[stage]
    out = tmp_path / "out"
    proc = subprocess.Popen([*MC, *COMPRESS, *flags, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "METACOMPRESS_PROGRESS": "1"})
    seen = []
    for line in proc.stderr:  # one progress note per stage
        seen.append(line.strip())
        if line.strip() == note:
            break
    assert seen and seen[-1] == note, seen
    time.sleep(wait)
    staged = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    proc.send_signal(signal.SIGTERM)
    stderr = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert error_lines(stderr) == ["error: interrupted by SIGTERM (nothing half-written is left)"], stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # the staging folder was removed
    if stage == "export":
        assert staged, "the signal came before outputs were staged: the test did not interrupt the export"


# ---------------------------------------------------------------- determinism

VOLATILE = ("timings_s", "latency_ms", "speedup", "out")  # wall-clock measurements and the path asked for


def without_timings(report):
    if isinstance(report, dict):
        return {k: without_timings(v) for k, v in report.items() if k not in VOLATILE}
    if isinstance(report, list):
        return [without_timings(v) for v in report]
    return report


@pytest.mark.integration
def test_same_seed_same_report_and_bytes(tmp_path):
    """Two runs at once, one seed, one torch thread each: the same report and the same bytes.
    (Across thread counts convolution sums change order: the report's ``determinism`` says so.)"""
    procs = {name: subprocess.Popen(
        [*MC, "compress", "mlp", "--data", "digits", "--train-epochs", "3", "--target-macs", "0.4",
         "--allocation", "lamp", "--repair-steps", "30", "--threads", "1", "--seed", "7",
         "--out", str(tmp_path / name), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**ENV, "OMP_NUM_THREADS": "1"}) for name in ("a", "b")}
    reports = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        reports[name] = json.loads(stdout)
    assert without_timings(reports["b"]) == without_timings(reports["a"])
    for output in ("model.onnx", "model.pt"):
        assert (tmp_path / "b" / output).read_bytes() == (tmp_path / "a" / output).read_bytes(), output
    assert reports["a"]["determinism"]["torch_threads"] == 1
    assert reports["a"]["compressed"]["accuracy"] > 0.5  # a real run, not an empty one
