"""`cli(*args)`: `edgeenc ARGS` in this process through typer's runner, as the tests call it.

Arguments are turned into strings (paths, numbers); an exception that is not the command's own exit is
raised here rather than left in the result, so a traceback fails the test where it happened.
"""

from __future__ import annotations

from typer.testing import CliRunner

from edgeenc.cli import app


def cli(*args, env: dict | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result
