"""Every example and the demo run against the fake replica set (smoke tests with a timeout)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py") if not p.stem.startswith("_"))


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name: str) -> None:
    result = _run(str(ROOT / "examples" / f"{name}.py"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "an example prints what it delivered"


def test_examples_runner_picks_by_name() -> None:
    result = _run("-m", "examples", env={"EXAMPLE": "basic"})
    assert result.returncode == 0, result.stderr
    assert "insert" in result.stdout and "update" in result.stdout
    missing = _run("-m", "examples", env={"EXAMPLE": "nope"})
    assert missing.returncode != 0 and "no example named 'nope'" in missing.stderr


def test_demo_command_delivers_every_change() -> None:
    result = _run("-m", "mongo_events", "demo", "--orders", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("insert") for line in lines) == 3
    assert sum(line.startswith("update") and "status=paid" in line for line in lines) == 3
    assert lines[-1] == "delivered 6 changes; bus stopped"
    assert "fake replica set" in result.stderr


def test_cli_usage_errors_exit_2() -> None:
    result = _run("-m", "mongo_events")
    assert result.returncode == 2 and "required: COMMAND (see mongo-events --help)" in result.stderr


def test_the_fake_without_mongomock_says_which_extra_to_install() -> None:
    code = "import sys; sys.modules['mongomock'] = None\nfrom mongo_events.testing import FakeReplicaSet"
    result = _run("-c", code)
    assert result.returncode == 1
    assert (
        "ImportError: FakeReplicaSet keeps its data in mongomock: pip install 'mongo-events[testing]'"
        in result.stderr
    )


def test_each_extra_brings_what_its_examples_import() -> None:
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = {name: value.split() for name, value in config["options.extras_require"].items()}
    assert any(
        req.startswith("opentelemetry-sdk") for req in extras["otel"]
    )  # examples/metrics.py imports the SDK
    assert "from opentelemetry.sdk" in (ROOT / "examples" / "metrics.py").read_text()
    assert any(req.startswith("mongomock") for req in extras["testing"])
    # The README's set-up command installs every extra the examples use.
    assert "pip install -e '.[testing,flask,django,otel]'" in (ROOT / "README.rst").read_text()


def test_tox_lint_checks_formatting_as_its_description_says() -> None:
    import configparser

    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    lint = tox["testenv:lint"]
    assert "format check" in lint["description"]
    assert "ruff format --check mongo_events tests examples" in lint["commands"]
