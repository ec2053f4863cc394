"""The README's fresh-machine commands: they make and enter a venv, and CI runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

VENV = "python3 -m venv .venv && . .venv/bin/activate && "


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_commands_make_and_use_a_venv():
    demo, tests = readme_commands()
    # PEP 668 systems refuse pip outside a venv, and some have no `python`: the venv comes first, python3 makes it.
    for command in (demo, tests):
        assert command.startswith(VENV), command
        assert "sudo" not in command and "--break-system-packages" not in command
    assert demo.endswith("edgeenc demo") and tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    tests = readme_commands()[1]
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f".ci/run does not run the README's test command {tests!r}"
    assert ".venv/" in (REPO_ROOT / ".gitignore").read_text().splitlines()
