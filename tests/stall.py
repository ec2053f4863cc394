"""CLIs that stall where a kill -9 hurts most, for the kill -9 tests (tests only: production code has no such
hook), and `kill_when_stalled`, which runs one and kills it there.

`STALLING_CLI + args` runs `edgeenc args` with every results store's SQLite connection wrapped: the N-th
transaction that stores windows (one watched file, or one listen batch) writes the marker file (with the
recording's path when it has one) just before its COMMIT and sleeps, to be killed there. `stall_env(n,
marker)` is the environment that asks for it.

`STALLING_INDEX_SAVE_CLI + args` runs `edgeenc args` with the writer's index saved after every file, and the
N-th save stopped after its new vectors file is written and before current.json names it (the marker holds
the count of windows that save would have made current). `stall_env(n, marker)` asks for it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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

_INDEX_SAVE_CODE = f"""
import os, pathlib, time
from edgeenc.runtime import neighbours
from edgeenc.runtime.recorder.store_index import StoreIndex
StoreIndex.save_every = 1
nth, _, marker = os.environ[{STALL_ENV!r}].partition(":")
saves = [0]
write = neighbours.write_json_atomic

def stalling(path, data):
    saves[0] += 1
    if saves[0] == int(nth):
        pathlib.Path(marker).write_text(str(data["count"]))
        time.sleep(3600)
    write(path, data)

neighbours.write_json_atomic = stalling
from edgeenc.cli import main
main()
"""

STALLING_INDEX_SAVE_CLI = [sys.executable, "-c", _INDEX_SAVE_CODE]


def stall_env(nth: int, marker: Path) -> dict[str, str]:
    return {**os.environ, STALL_ENV: f"{nth}:{marker}"}


def kill_when_stalled(command: list[str], nth: int, marker: Path, timeout: float = 60.0, **popen) -> None:
    """Run a stalling CLI until its N-th stall writes `marker`, then SIGKILL it; fail with its stderr if it ends
    (or does not stall within `timeout` seconds) first."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=stall_env(nth, marker),
                            **popen)
    try:
        deadline = time.time() + timeout
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no stall"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
