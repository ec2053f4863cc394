"""A CLI that stalls inside a results-database transaction, for the kill -9 tests (tests only: production
code has no such hook).

`STALLING_CLI + args` runs `edgeenc args` with every results store's SQLite connection wrapped: the N-th
transaction that stores windows (one watched file, or one listen batch) writes the marker file (with the
recording's path when it has one) just before its COMMIT and sleeps, to be killed there. `stall_env(n,
marker)` is the environment that asks for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

STALL_ENV = "EDGEENC_TESTS_STALL_BEFORE_COMMIT"

_CODE = f"""
import os, pathlib, time
from edgeenc.runtime.recorder import store
nth, _, marker = os.environ[{STALL_ENV!r}].partition(":")
commits = [0]

class Stalling:
    def __init__(self, conn):
        self.conn, self.windows, self.path = conn, False, "stream"

    def execute(self, sql, *args):
        if sql.startswith("INSERT INTO files"):
            self.path = args[0][0]
        if sql.startswith("INSERT INTO windows"):
            self.windows = True
        if sql == "COMMIT" and self.windows:
            self.windows = False
            commits[0] += 1
            if commits[0] == int(nth):
                pathlib.Path(marker).write_text(self.path)
                time.sleep(3600)
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)

connect = store._connect
store._connect = lambda path: Stalling(connect(path))
from edgeenc.cli import main
main()
"""

STALLING_CLI = [sys.executable, "-c", _CODE]


def stall_env(nth: int, marker: Path) -> dict[str, str]:
    return {**os.environ, STALL_ENV: f"{nth}:{marker}"}
