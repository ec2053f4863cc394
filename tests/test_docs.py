"""Every example path in README, docs/ and cpp/README.md exists by the time a reader gets to it.

The commands of each file's code blocks are read in order, as a reader runs them after README's first
command (`edgeenc demo`, which writes bundles/demo): a path an example reads must be in the checkout or
written by a command before it (`-o`, `--db`, `export`'s bundle, `demo`, `cpp/build.sh`). Placeholders are
written in capitals (BUNDLE, RECORDINGS/, OUT_DIR) and absolute paths are a recorder's own (/data/inbox);
neither is checked.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "cpp" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OUTPUT_OPTIONS = ("-o", "--out", "--db", "--json", "--save-clips")
SUFFIXES = (".npz", ".csv", ".txt", ".parquet", ".sqlite", ".json", ".wav", ".flac", ".onnx", ".mp3", ".ogg")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*([./:]|$)")
STRING = re.compile(r"""["']([^"']+)["']""")


def code_lines(doc: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line inside a fenced code block."""
    lines, inside = [], False
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append((number, line))
    return lines


def is_path(token: str) -> bool:
    return ("/" in token or token.endswith(SUFFIXES)) and "://" not in token and not token.startswith(("-", "$"))


def example_paths(line: str) -> tuple[list[str], list[str]]:
    """(paths the command reads, paths it writes) of one line of a code block."""
    if "Encoder.load(" in line or "embed_file(" in line or "classify_file(" in line:
        return [s for s in STRING.findall(line) if is_path(s)], []
    command = line.split(" #")[0].split("|")[-1].strip()
    if not (command.startswith(("edgeenc ", "cpp/build/edgeenc-embed", "bash cpp/build.sh",
                                "python tests/probe_data.py"))):
        return [], []
    try:
        tokens = shlex.split(command)
    except ValueError:
        return [], []
    writes = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in OUTPUT_OPTIONS]
    if tokens[:2] == ["edgeenc", "export"] and "-o" not in tokens and "--out" not in tokens:
        writes.append(f"bundles/{tokens[2]}")
    if tokens[:2] == ["edgeenc", "demo"]:
        writes.append("bundles/demo")
    if tokens[:2] == ["bash", "cpp/build.sh"]:
        writes.append("cpp/build")
    if tokens[:2] == ["python", "tests/probe_data.py"]:  # the labelled set of README's probe example
        writes.append(tokens[2])
    reads = [t for t in tokens[1:] if is_path(t) and t not in writes]
    return reads, writes


def unchecked(path: str) -> bool:
    return bool(PLACEHOLDER.match(path)) or path.startswith(("/", "~")) or path in ("...",)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_example_path_exists_when_it_is_used(doc):
    written = {"bundles/demo"}  # README's command 1 ran first
    missing = []
    for number, line in code_lines(doc):
        reads, writes = example_paths(line)
        for path in reads:
            clean = path.rstrip("/").split("*")[0].rstrip("/")
            known = (REPO / clean).exists() or any(clean == w.rstrip("/") or clean.startswith(w.rstrip("/") + "/")
                                                   for w in written)
            if not unchecked(path) and not known:
                missing.append(f"{doc.relative_to(REPO)}:{number}: {path}")
        written.update(writes)
    assert not missing, "example paths that do not exist when they are used:\n" + "\n".join(missing)


def test_the_check_finds_a_path_that_does_not_exist():
    reads, _ = example_paths("edgeenc info bundles/esp_aves2_sl_eat_all_ssl_all  # a comment")
    assert reads == ["bundles/esp_aves2_sl_eat_all_ssl_all"] and not (REPO / reads[0]).exists()
    assert example_paths('encoder = Encoder.load("bundles/x", device="auto")')[0] == ["bundles/x"]
    assert unchecked("BUNDLE") and unchecked("RECORDINGS/") and unchecked("/data/inbox")
    assert example_paths("edgeenc embed BUNDLE RECORDINGS/ -o out.npz")[1] == ["out.npz"]
