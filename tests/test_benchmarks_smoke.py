"""Every benchmark script runs in its smoke-sized mode and prints its table.

The full runs are long (minutes to an hour) and live in BENCHMARKS.md with their commands;
these keep the scripts from rotting. Marked by size, not skipped: each must exit 0 and print
the table headers the full run prints.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def run_bench(tmp_path, script, *args):
    env = {**os.environ, "METACOMPRESS_PROGRESS": "0", "METACOMPRESS_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_meta_core_smoke(tmp_path):
    out = run_bench(tmp_path, "meta_core.py", "--quick")
    assert "higher" in out and "tasks/s" in out


def test_meta_fewshot_smoke(tmp_path):
    out = run_bench(tmp_path, "meta_fewshot.py", "--quick")
    assert "maml" in out and "joint" in out and "no-adapt" in out


def test_fusion_merge_smoke(tmp_path):
    out = run_bench(tmp_path, "fusion_merge.py", "--quick")
    assert "TIES" in out and "DARE" in out and "Fisher" in out


def test_repair_defaults_smoke(tmp_path):
    out = run_bench(tmp_path, "repair_defaults.py", "--quick", "--workers", "1")
    assert "| lr | T | alpha | mean |" in out


def test_policy_vs_baselines_smoke(tmp_path):
    out = run_bench(tmp_path, "policy_vs_baselines.py", "--smoke")
    assert "| regime | meta | meta+guard | meta+uniform-guard | meta+screened-guard | meta-alloc | uniform |" in out
    assert "es-search" in out


@pytest.mark.parametrize("script", ["deploy.py", "compress_latency.py"])
def test_latency_benchmarks_smoke(tmp_path, script):
    if not (ROOT / "benchmarks" / script).exists():
        pytest.fail(f"benchmarks/{script} is missing")
    args = ["--quick", "--only", "mobilenet_v2"] if script == "deploy.py" else ["--smoke"]
    out = run_bench(tmp_path, script, *args)
    assert "speedup" in out.lower()


def test_students_soup_smoke(tmp_path):
    out = run_bench(tmp_path, "students_soup.py", "--quick")
    assert "| model | students | greedy soup | mean student |" in out and "| mlp | forked |" in out and "wins/ties/losses" in out


def test_compress_parity_smoke(tmp_path):
    out = run_bench(tmp_path, "compress_parity.py", "--quick")
    assert "| mlp | uniform |" in out


def test_robustify_smoke(tmp_path):
    out = run_bench(tmp_path, "robustify.py", "--model", "mlp", "--data", "digits", "--quick", "--set", "tasks=2",
                    "--choose-rate")
    assert "| condition |" in out and "| plain+extra |" in out and "| robust, rate on validation |" in out


def test_robustify_latency_smoke(tmp_path):
    out = run_bench(tmp_path, "robustify_latency.py", "--model", "mlp", "--data", "digits", "--targets", "0.6",
                    "--steps", "0", "--epochs", "2", "--robustify-steps", "2", "--workdir", str(tmp_path / "work"))
    assert "(c) plain + extra training" in out and "| 0.6 | BN only |" in out


def test_repair_rescue_smoke(tmp_path):
    out = run_bench(tmp_path, "repair_rescue.py", "--models", "mlp", "--data", "digits", "--targets", "0.5",
                    "--steps", "5")
    assert "| mlp |" in out


def test_distributed_smoke(tmp_path):
    out = run_bench(tmp_path, "distributed.py", "--quick")
    assert "policy ES, reward jobs/s" in out and "data-parallel repair" in out and "estimated ES efficiency" in out


def test_conv_layout_smoke(tmp_path):
    out = run_bench(tmp_path, "conv_layout.py", "--models", "regnet_y_400mf", "--repeats", "1", "--batch", "2")
    assert "| model | eval: NCHW / channels-last" in out and "| regnet_y_400mf |" in out


def test_text_tokens_smoke(tmp_path):
    out = run_bench(tmp_path, "text_tokens.py", "--length", "8", "--n", "200", "--epochs", "1", "--targets", "macs=0.5")
    row = next(line for line in out.splitlines() if line.startswith("| macs 0.5 |"))
    assert float(row.split("|")[4]) == pytest.approx(0.5, abs=0.01)
