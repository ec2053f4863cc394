"""What every edgeenc command shares: exit codes, printing, progress, the option groups, opening an encoder.

Options that several commands take are declared once here, as groups that become one value each: the
window options (runtime `WindowOptions`), the encoder choice (`EncoderChoice`: device, threads, variant,
CPU engine) and the scoring (runtime `ScoreOptions`). A command names a group as one parameter, e.g.
``windows: WindowOptions = WindowOptions()``, and `@grouped_options` spreads it into its command-line flags
(the default instance gives their defaults) and builds the value back before the command runs.
Library code never imports this (tests/test_architecture.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import sys
import time
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from edgeenc.progress import Progress
from edgeenc.runtime.scores import ScoreOptions
from edgeenc.runtime.windows import WindowOptions


class ExitStatus(IntEnum):
    """Every exit code of every command (README's table)."""

    OK = 0
    FAILED = 1  # `build`: TensorRT could not build the engine
    USAGE = 2  # a bad option, bundle, input or missing software: said in one line, nothing was done
    PARITY_FAILED = 3  # export / optimize / build wrote a result that failed its parity gate
    SOME_FILES_FAILED = 4  # the other files were done and written; the failed ones are listed
    LOCKED = 5  # another watcher or listener holds the results database
    SOURCE_FAILED = 6  # `listen`: the live source failed (the windows so far are stored)
    INTERRUPTED = 130  # Ctrl-C


def err(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def note(message: str) -> None:
    typer.echo(message, err=True)


def fail(message: str, status: ExitStatus = ExitStatus.USAGE) -> NoReturn:
    """Say what is wrong in one line and end the command with `status`."""
    err(message)
    raise typer.Exit(status)


@contextlib.contextmanager
def failing_on(*errors: type[BaseException], status: ExitStatus = ExitStatus.USAGE) -> Iterator[None]:
    """Library errors of these types end the command with their message and `status`, not a traceback."""
    try:
        yield
    except errors as exc:
        fail(str(exc), status)


def require(command: str, *modules: str, extra: str = "export") -> None:
    """End `command` with the extra to install when one of `modules` is missing (a runtime-only install has
    no torch, onnx or huggingface_hub: `edgeenc[cpu]` is the recorder's install)."""
    def missing(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return True

    absent = [name for name in modules if missing(name)]
    if absent:
        fail(f"`edgeenc {command}` needs {', '.join(absent)}, which this install lacks (the runtime-only "
             f"'edgeenc[cpu]'?): pip install 'edgeenc[{extra}]', PyTorch first as README says for this kind of "
             "machine")


def progress_printer() -> Progress:
    start = time.time()

    def say(message: str) -> None:
        note(f"[{time.time() - start:6.1f}s] {message}")

    return say


# ---------------------------------------------------------------------------------------------- option groups


@dataclass(frozen=True)
class EncoderChoice:
    """Which backend, CPU variant and engine run the bundle (`Encoder.load`'s choices), and how much to say."""

    device: str = "auto"
    threads: int | None = None
    variant: str | None = None
    cpu_engine: str | None = None
    head: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        from edgeenc.runtime.backends import DEVICES, check_threads
        from edgeenc.runtime.bundle import HEADS

        if self.head is not None and self.head not in HEADS:
            raise ValueError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")

        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check_threads(self.threads)

    def open(self, bundle: Path, device: str | None = None):
        """The Encoder, after printing which backend runs (every skipped one too with --verbose)."""
        from edgeenc.runtime import BundleError, Encoder, RandomWeightsWarning
        from edgeenc.runtime.backends import BackendUnavailable

        with failing_on(BundleError, BackendUnavailable, ValueError), warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)  # said below, in the command's own words
            encoder = Encoder.load(bundle, device or self.device, threads=self.threads, variant=self.variant,
                                   cpu_engine=self.cpu_engine, head=self.head)
        for line in encoder.backend_log if self.verbose else encoder.backend_brief:
            note(line)
        if encoder.manifest.get("random_init"):
            note("warning: this bundle holds RANDOM weights (--random-init): outputs are meaningless")
        return encoder


OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing output (without it, an existing "
                                                                "output is refused unless this run resumes it)")]


@dataclass(frozen=True)
class Scoring:
    """The scoring flags of classify, watch, listen and Ray. `options(encoder)` checks them against the model's
    labels (a thresholds file or list naming an unknown label is refused with the closest names)."""

    top_k: int = 5
    threshold: float | None = None
    activation: str | None = None
    thresholds: Path | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    min_windows: int = 1

    def __post_init__(self) -> None:  # what needs no labels is checked before any model loads
        ScoreOptions(self.top_k, self.threshold, self.activation, min_windows=self.min_windows)

    def options(self, encoder) -> ScoreOptions:
        from edgeenc.runtime.scores import read_labels, read_thresholds

        labels = encoder.labels or []
        with failing_on(ValueError):
            return encoder.scoring(ScoreOptions(
                self.top_k, self.threshold, self.activation,
                thresholds=read_thresholds(self.thresholds, labels) if self.thresholds else (),
                include=read_labels(self.include or [], labels, "--include"),
                exclude=read_labels(self.exclude or [], labels, "--exclude"), min_windows=self.min_windows))


def flag_type(kind: Any, help: str, *names: str) -> Any:
    """The annotation of one option: its type and how typer shows it."""
    return Annotated[kind, typer.Option(*names, help=help)]


# group -> {parameter name: (field, Annotated type)}; a parameter name is its flag (window -> --window)
OPTION_GROUPS: dict[type, dict[str, tuple[str, Any]]] = {
    WindowOptions: {
        "window": ("window_seconds", flag_type(float | None, "window seconds (default: the model's native length)")),
        "hop": ("hop_seconds", flag_type(float | None, "hop seconds (default: = window)")),
        "last": ("last", flag_type(str, "last partial window: auto (its true length, but dropped when shorter than "
                                      "half the window or 1 s, unless it is the file's only window), short (true "
                                      "length, always), pad, or drop; for listen, where the source ends")),
        "batch": ("batch_size", flag_type(int | None, "windows per inference batch (listen: at most, when behind); "
                                                      "default: the best batch `optimize` measured for the variant "
                                                      "that runs (`edgeenc info`), else 8")),
        "channel": ("channel", flag_type(int | None, "use this channel (0-based) instead of the mean")),
    },
    EncoderChoice: {
        "device": ("device", flag_type(str, "auto, trt, cuda or cpu")),
        "threads": ("threads", flag_type(int | None, "CPU threads for ONNX Runtime / OpenVINO")),
        "variant": ("variant", flag_type(str | None, "a gated CPU variant, e.g. int8dyn, or bf16 with --cpu-engine "
                                                   "openvino (see `edgeenc info`; default: the bundle's timed one)")),
        "cpu_engine": ("cpu_engine", flag_type(str | None, "CPU engine: onnxruntime or openvino (default: the "
                                                         "bundle's timed CPU default, see `edgeenc info`)")),
        "head": ("head", flag_type(str | None, "which classifier head scores windows: probe (one attached with "
                                               "`edgeenc probe attach`) or model (the model's own); default: the "
                                               "probe where the bundle has one")),
        "verbose": ("verbose", flag_type(bool, "say why every other backend was skipped", "-v", "--verbose")),
    },
    Scoring: {
        "top_k": ("top_k", flag_type(int, "labels per window", "--top-k")),
        "threshold": ("threshold", flag_type(float | None, "keep only scores >= this")),
        "activation": ("activation", flag_type(str | None, "sigmoid (independent labels) or softmax (one label "
                                                           "per window); default: the head's own (`edgeenc info`)")),
        "thresholds": ("thresholds", flag_type(Path | None, "CSV of label,threshold rows: a threshold per label "
                                                            "(the others keep --threshold)")),
        "include": ("include", flag_type(list[str] | None, "keep only this label (repeatable), or a text file of "
                                                           "labels, one per line")),
        "exclude": ("exclude", flag_type(list[str] | None, "never keep this label (repeatable), or a text file of "
                                                           "labels")),
        "min_windows": ("min_windows", flag_type(int, "a label counts only in at least this many consecutive "
                                                      "windows over its threshold (repeat confirmation)")),
    },
}


def register_group(group: type, flags: dict[str, tuple[str, Any]]) -> None:
    """Declare another option group (e.g. the run strategy of cli_ray) for `@grouped_options`."""
    OPTION_GROUPS[group] = flags


def grouped_options(command: Callable) -> Callable:
    """Spread the command's group parameters (OPTION_GROUPS) into their flags for typer; rebuild them on call.

    A value a group refuses (its ValueError, e.g. --last never) ends the command with exit 2 before any work.
    """
    hints = typing.get_type_hints(command, include_extras=True)
    flags = {flag for group in OPTION_GROUPS.values() for flag in group}
    params, groups = [], {}
    for param in inspect.signature(command).parameters.values():
        group = hints.get(param.name)
        if param.name in flags:  # the value would be taken for a flag of the same name
            raise TypeError(f"{command.__name__}: parameter {param.name!r} is also the name of a grouped option")
        if group in OPTION_GROUPS:
            default = group() if param.default is inspect.Parameter.empty else param.default
            groups[param.name] = group
            params += [inspect.Parameter(flag, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                         default=getattr(default, field))
                       for flag, (field, annotation) in OPTION_GROUPS[group].items()]
        else:
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[param.name]))

    def run(**kwargs):
        for name, group in groups.items():
            values = {field: kwargs.pop(flag) for flag, (field, _) in OPTION_GROUPS[group].items()}
            with failing_on(ValueError):
                kwargs[name] = group(**values)
        return command(**kwargs)

    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    for attribute in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(run, attribute, getattr(command, attribute))
    return run


# ---------------------------------------------------------------------------------------------- files


def audio_files(audio: Iterable[Path | str]) -> tuple[list[Path], int]:
    """Files as given, and every audio file under the given folders (runtime.audio.audio_files); and how many
    folders could not be listed (each said as an error: they count as failed inputs)."""
    from edgeenc.runtime.audio import audio_files as find

    audio, unlisted = list(audio), []
    missing = [str(a) for a in audio if not os.path.lexists(a)]
    if missing:  # a mistyped path: say so before any model loads
        fail(f"{missing[0]}: no such file or folder" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def unreadable(folder: str, exc: OSError) -> None:
        unlisted.append(folder)
        err(f"{folder}: cannot be listed ({(exc.strerror or str(exc)).lower()}); its recordings are not included")

    files = [Path(p) for p in find(audio, unreadable)]
    if not files and not unlisted:
        fail("no audio files found in " + ", ".join(map(str, audio)))
    return files, len(unlisted)


class AudioProgress:
    """A progress bar over hours of audio with files done and failed, errors printed above it as they come."""

    def __init__(self, total_seconds: float, files: int, started: float | None = None) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.files, self.done, self.failed, self.seconds = files, 0, 0, 0.0
        self.started = started  # given: the bar also shows the real-time factor since then
        self.bar = tqdm(total=round(total_seconds / 3600, 4), unit="h", desc="audio", file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} h audio [{elapsed}<{remaining}] {postfix}",
                        disable=None)

    def write(self, line: str) -> None:
        self.tqdm.write(line, file=sys.stderr)

    def advance(self, seconds: float) -> None:
        """`seconds` more audio done (a range of a long file, or a whole file)."""
        self.seconds += seconds
        self.bar.update(round(seconds / 3600, 4))
        self._postfix()

    def count(self, outcome) -> None:
        """A file finished or failed (its error printed)."""
        if outcome.error:
            self.failed += 1
            self.write(f"error: {outcome.path}: {outcome.error}")
        else:
            self.done += 1
        self._postfix()

    def update(self, outcome) -> None:
        """A whole file's outcome, its audio with it."""
        self.count(outcome)
        if not outcome.error:
            self.advance(outcome.audio_seconds)

    def _postfix(self) -> None:
        postfix = f"{self.done + self.failed}/{self.files} files, {self.failed} failed"
        if self.started is not None:
            postfix += f", {self.seconds / max(time.time() - self.started, 1e-9):.1f}x real time"
        self.bar.set_postfix_str(postfix)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------- recorder


def recorder_logging(quiet: bool, events_logger: str) -> None:
    """Timestamped log lines on stderr for the long-running recorder commands (watch, listen)."""
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger(events_logger).setLevel(logging.CRITICAL + 1)  # the command prints these events itself


class WindowsProgress:
    """A progress bar over windows for long index builds; quiet for small ones."""

    def __init__(self, what: str, shown_from: int = 50000) -> None:
        self.what, self.shown_from, self.bar = what, shown_from, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if total < self.shown_from:
                return
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="window", desc=self.what, file=sys.stderr, unit_scale=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def keep_results_index(store, wanted: bool) -> None:
    """`--index`: the writer keeps the results file's nearest-neighbour index (when usearch is installed)."""
    from edgeenc.runtime.neighbours import INDEX_EXTRA, have_index_library

    if not wanted:
        return
    if not have_index_library():
        note(f"note: no nearest-neighbour index (usearch is not installed): `edgeenc search` will score every "
             f"stored window; {INDEX_EXTRA} for it")
        return
    from edgeenc.runtime.neighbours import IndexProblem
    from edgeenc.runtime.recorder import keep_index

    progress = WindowsProgress("rebuilding the index")
    try:
        keep_index(store, on_note=note, on_progress=progress)
    except (OSError, IndexProblem) as exc:  # the recordings matter more: go on without the index
        note(f"warning: no index this run ({exc}); `edgeenc search` scores the stored windows exactly")
    finally:
        progress.close()


def open_results_store(opener):
    """The SQLite results store `opener()` returns; a locked one exits LOCKED, a bad one USAGE."""
    from edgeenc.runtime.recorder import StoreError, StoreLocked

    with failing_on(StoreError), failing_on(StoreLocked, status=ExitStatus.LOCKED):  # the inner one sees it first
        return opener()
