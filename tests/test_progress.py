"""Progress bars: one live display at a time, and bars on long evaluation passes only."""

import io

import pytest
import torch
from rich.console import Console
from torch import nn

from metacompress import progress
from metacompress.training import predict


@pytest.fixture
def terminal(monkeypatch):
    """Bars on, drawn into a string as if on a terminal."""
    out = io.StringIO()
    monkeypatch.setattr(progress, "_console", Console(file=out, force_terminal=True, width=100))
    monkeypatch.setenv("METACOMPRESS_PROGRESS", "1")
    return out


def test_a_loop_inside_a_tracked_loop_runs_without_its_own_bar(terminal):
    """rich allows one live display at a time: a bar started inside another bar's loop used to
    raise LiveError. The inner loop still yields everything, and the outer bar is drawn."""
    seen = [(i, list(progress.track(range(3), "inner"))) for i in progress.track(range(2), "outer")]
    assert seen == [(0, [0, 1, 2]), (1, [0, 1, 2])]
    assert "outer" in terminal.getvalue() and "inner" not in terminal.getvalue()
    assert list(progress.track(range(2), "after")) == [0, 1] and "after" in terminal.getvalue()  # the flag is reset


def test_long_evaluation_passes_show_a_bar_and_short_ones_do_not(terminal):
    model = nn.Linear(4, 3)
    x = torch.randn(50, 4)
    short = predict(model, x, batch_size=10)  # 5 batches
    assert terminal.getvalue() == ""
    long = predict(model, x, batch_size=2)    # 25 batches
    assert "evaluating" in terminal.getvalue()
    assert torch.allclose(short, long, atol=1e-6) and short.shape == (50, 3)
