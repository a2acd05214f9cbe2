"""Every example in ``examples/`` runs to completion as a script (each well under 2 minutes on a CPU core)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# What each example must print (a check that it got to its end, beyond the exit code).
EXPECTED = {
    "certify_digits_mlp.py": ["clean accuracy", "median certified row_l1 radius"],
    "attack_then_art_pgd.py": ["WeightPGD perturbation", "user's weights unchanged: True"],
    "train_robust_and_compare.py": ["robust training", "robust_curve.png"],
    "small_cnn_end_to_end.py": ["joint weight + input attack", "robust   CNN"],
    "evaluate_torchscript_model.py": ["certified (interval)", "report.md"],
    "bit_flip_attack.py": ["BFA:", "random flips", "T-BFA", "ART FGSM"],
}
# Examples with tests of their own elsewhere (longer runs).
TESTED_ELSEWHERE = {"reproduce_paper.py", "generalization_measures.py"}


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES.glob("*.py")} - TESTED_ELSEWHERE == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name, tmp_path):
    args = ["--out", str(tmp_path)] if name in ("train_robust_and_compare.py", "evaluate_torchscript_model.py") else []
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(EXAMPLES / name), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for text in EXPECTED[name]:
        assert text in result.stdout, result.stdout
    if name == "train_robust_and_compare.py":
        assert (tmp_path / "robust_curve.png").stat().st_size > 1000
    if name == "evaluate_torchscript_model.py":
        assert (tmp_path / "report" / "report.json").is_file()


def test_benchmarks_run_all_collects_every_ratio(tmp_path):
    (tmp_path / "bench_fast.py").write_text(
        "import json\n"
        "print('warming up')\n"
        "print(json.dumps({'per_ball': {'inf': {'ratio_median': 1.2, 'ratios': [1.1, 1.3]}},"
        " 'ratio_to_art_fit': {'paper': 1.5}, 'meets_targets': True, 'seconds': 3.0}, indent=2))\n"
    )
    (tmp_path / "bench_broken.py").write_text("raise SystemExit('no luck')\n")
    run_all = EXAMPLES.parent / "benchmarks" / "run_all.py"
    result = subprocess.run(
        [sys.executable, str(run_all), "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1  # one benchmark failed
    summary = json.loads(result.stdout)
    assert summary["ratios"] == {"bench_fast.per_ball.inf.ratio_median": 1.2, "bench_fast.ratio_to_art_fit.paper": 1.5}
    assert summary["meets_targets"] == {"bench_fast.meets_targets": True}
    assert "no luck" in summary["benchmarks"]["bench_broken"]["error"]


def test_gpu_check_script_parses_and_the_benchmarks_refuse_cuda_without_it():
    """``benchmarks/gpu_check.sh`` (the one run of a session lent a GPU) is valid bash, and the benchmarks it calls
    stop with a clear message when ``--device cuda`` has no CUDA device (the dry run ``DEVICE=cpu`` is too slow for a
    test: it times every bound)."""
    benchmarks = EXAMPLES.parent / "benchmarks"
    assert subprocess.run(["bash", "-n", str(benchmarks / "gpu_check.sh")], capture_output=True).returncode == 0
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    runs = {
        script: subprocess.Popen(
            [sys.executable, str(benchmarks / script), "--device", "cuda"], stderr=subprocess.PIPE, text=True
        )
        for script in ("bench_certify.py", "bench_residual.py")
    }  # side by side: each spends its seconds importing torch and ART
    for script, run in runs.items():
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 2 and "no CUDA device" in stderr, script
