"""The one type of a progress callback: library code reports long work through it, the CLI prints it."""

from collections.abc import Callable

Progress = Callable[[str], None]  # called with one line, e.g. "parity 10s_batch1 [1, 160000]"
