"""Packaging: the console script, the CI entry point's exit codes, the declared metadata and the public names."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import art_weightpert
import art_weightpert.metrics

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("art-weightpert")
    command = [exe, *args] if exe else [sys.executable, "-m", "art_weightpert.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "MPLBACKEND": "Agg"})


def test_console_script_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"art-weightpert {art_weightpert.__version__}"


def test_console_script_help():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: art-weightpert")
    assert "weight" in result.stdout.lower()


def test_installed_metadata_matches_the_package():
    assert importlib.metadata.version("art-weightpert") == art_weightpert.__version__
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("art-weightpert") == "art_weightpert.cli:main"


def test_public_api_names():
    expected = {
        "PerturbationBudget", "WeightPerturbation", "UnsupportedModelError", "PyTorchWeightClassifier", "WeightPGD",
        "RandomWeightPerturbation", "JointWeightInputPGD", "WeightPerturbationCertifier", "WeightRobustTrainer",
    }  # fmt: skip
    assert expected <= set(art_weightpert.__all__)
    metrics = {
        "weight_certified_accuracy",
        "certified_weight_radius",
        "weight_robustness_curve",
        "generalization_bound",
    }
    assert metrics <= set(art_weightpert.metrics.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        art_weightpert.Nope  # noqa: B018


# ---------------------------------------------------------------------------------------------------- .ci/run
@pytest.fixture
def fake_python(tmp_path):
    """Stubs first on PATH: ``python`` (torch imports, pip succeeds unless told, pytest exits with $FAKE_PYTEST_RC),
    ``lint-imports`` (exits with $FAKE_LINT_RC) and ``mkdocs`` (succeeds; the real strict build is
    tests/test_docs_site.py's)."""
    lint = tmp_path / "lint-imports"
    lint.write_text('#!/usr/bin/env bash\necho lint-imports >> "$FAKE_LOG"\nexit "${FAKE_LINT_RC:-0}"\n')
    lint.chmod(0o755)
    mkdocs = tmp_path / "mkdocs"
    mkdocs.write_text('#!/usr/bin/env bash\necho mkdocs "$@" >> "$FAKE_LOG"\nexit 0\n')
    mkdocs.chmod(0o755)
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$@" >> "$FAKE_LOG"\n'
        'if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then exit "${FAKE_PYTEST_RC:-0}"; fi\n'
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit "${FAKE_PIP_RC:-0}"; fi\n'
        "exit 0\n"
    )
    stub.chmod(0o755)

    def run(pytest_rc: int = 0, pip_rc: int = 0, lint_rc: int = 0) -> tuple[subprocess.CompletedProcess, str]:
        log = tmp_path / "log.txt"
        log.write_text("")
        env = {
            **os.environ,
            "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
            "FAKE_PYTEST_RC": str(pytest_rc),
            "FAKE_PIP_RC": str(pip_rc),
            "FAKE_LINT_RC": str(lint_rc),
            "FAKE_LOG": str(log),
        }
        result = subprocess.run(["bash", str(CI_RUN)], capture_output=True, text=True, env=env, timeout=60)
        return result, log.read_text()

    return run


def test_ci_run_exit_codes(fake_python):
    result, log = fake_python(pytest_rc=0)
    assert result.returncode == 0, result.stderr
    assert "-m pip install -e .[test]" in log and "lint-imports" in log and "-m pytest" in log
    assert "mkdocs build --strict" in log
    assert fake_python(pytest_rc=1)[0].returncode == 1  # a failing test fails CI
    result, _ = fake_python(pytest_rc=5)  # "no tests collected" is not a success
    assert result.returncode != 0 and "no tests" in result.stderr
    result, log = fake_python(pip_rc=1)  # a failed install stops before the tests
    assert result.returncode != 0 and "pytest" not in log
    result, log = fake_python(lint_rc=1)  # a broken architecture contract fails CI before the tests
    assert result.returncode != 0 and "pytest" not in log
