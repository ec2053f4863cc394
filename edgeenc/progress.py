"""The types of progress callbacks: library code reports long work through them, the CLI prints it (a line, or a
bar over counted work)."""

from collections.abc import Callable

Progress = Callable[[str], None]  # called with one line, e.g. "parity 10s_batch1 [1, 160000]"
Counted = Callable[[int, int], None]  # called with (done, total) of counted work, e.g. windows indexed
