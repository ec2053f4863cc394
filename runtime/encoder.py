"""The Encoder API: a bundle in, embeddings and class scores per window out. Never imports torch.

Everything about the model (sample rate, window length, minimum input, embedding width, labels)
comes from the bundle's manifest, or from the ONNX metadata when given a bare model.onnx.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .audio import AudioError, iter_blocks
from .backends import Backend, BackendUnavailable, brief_log, import_onnxruntime, select_backend
from .bundle import BundleError, Head, choose_head, read_manifest, verify_bundle
from .scores import Event, NoClassifierHead, ScoreOptions, confirmed, detections, merge_events
from .windows import Window, WindowBatcher, WindowOptions, iter_windows
from .writers import ClassRow

_SCORE_FIELDS = {f.name for f in fields(ScoreOptions)}
DEFAULT_BATCH = 8  # windows per call where neither the caller nor the bundle's measured sweep says


class RandomWeightsWarning(UserWarning):
    """The bundle was exported with random weights (for tests and demos): its numbers mean nothing."""


@dataclass
class EmbeddingResult:
    """Per-window results of one recording (or one array)."""

    file: str | None
    starts: np.ndarray  # [n] seconds
    ends: np.ndarray  # [n] seconds
    embeddings: np.ndarray  # [n, dim] float32
    logits: np.ndarray | None = None  # [n, classes] float32 when the bundle has a classifier

    def __len__(self) -> int:
        return len(self.starts)


@dataclass
class FileOutcome:
    """One file of a multi-file run: a result or the error that stopped it."""

    path: str
    result: EmbeddingResult | None = None
    error: str | None = None
    audio_seconds: float = 0.0


@dataclass
class BatchOutputs:
    """What `Encoder.run_batch` made of a batch: outputs of the rows that ran, and the rows it refused."""

    rows: np.ndarray  # indices of the windows whose outputs these are, in order
    outputs: dict[str, np.ndarray]  # embedding[, logits], one row per index in `rows`
    nonfinite_input: np.ndarray  # windows with NaN or infinite samples (not run)
    nonfinite_output: np.ndarray  # windows whose outputs were not finite (dropped)


@dataclass
class Stream:
    """Audio for `Encoder.embed_streams`: mono blocks at the model's rate, e.g. one range of a long file."""

    name: str
    blocks: Iterable[np.ndarray]
    options: WindowOptions | None = None  # how this stream is cut; None: the run's options
    offset_seconds: float = 0.0  # where its first sample lies in its file (for error messages)


@dataclass
class _Pending:
    path: str
    offset: float = 0.0
    windows: list[Window] = field(default_factory=list)
    outputs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    done_reading: bool = False
    error: str | None = None


def _labels(bundle: Path, head: Head) -> list[str]:
    """The head's labels file (labels.json, probe_labels.json), one name per logit; class_<i> where there is none."""
    classes = head.num_classes
    path = bundle / head.labels_file
    if not path.is_file():
        return [f"class_{i}" for i in range(classes)]
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot be read ({exc}); re-export the bundle") from None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise BundleError(f"{path}: must be a JSON list of class names in logit order; re-export the bundle")
    if classes and len(labels) != classes:
        raise BundleError(f"{path} has {len(labels)} names for the model's {classes} classes; re-export the bundle")
    return labels


def _manifest_from_onnx(path: Path) -> dict:
    ort = import_onnxruntime()
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    if "sample_rate" not in meta:
        raise BundleError(f"{path}: no edgeenc metadata (sample_rate, window_seconds) in the ONNX file")
    outputs = [{"name": "tokens"}, {"name": "embedding"}]
    head_output = meta.get("class_outputs_key") or "logits"
    if int(meta.get("model_num_classes", meta.get("num_classes", "0"))):
        outputs.append({"name": "logits"})
    probe = None
    if head_output != "logits":  # an attached probe: the metadata describes it as the default head
        outputs.append({"name": head_output})
        probe = {"output": head_output, "activation": meta.get("activation") or "sigmoid",
                 "classes": json.loads(meta.get("classes") or "[]")}
    return {
        "model_id": meta.get("model_id"),
        "sample_rate": int(meta["sample_rate"]),
        "window_seconds": float(meta["window_seconds"]),
        "min_samples": int(meta.get("min_samples", "400")),
        "embedding_dim": int(meta["embedding_dim"]),
        "num_classes": int(meta.get("model_num_classes", meta.get("num_classes", "0"))),
        "activation": meta.get("model_activation", meta.get("activation")) or None,
        **({"probe": probe} if probe else {}),
        "random_init": meta.get("random_init") == "true",
        "licence": meta.get("licence"),
        "outputs": outputs,
    }


class Encoder:
    """Runs a bundle on the best (or the requested) backend."""

    def __init__(self, bundle: Path, manifest: dict, backend: Backend, labels: list[str] | None, log: list[str],
                 brief: list[str] | None = None, head: Head | None = None):
        self.bundle = bundle
        self.manifest = manifest
        self.backend = backend
        self.labels = labels
        self.backend_log = log  # every backend tried and why it was skipped
        self.backend_brief = log if brief is None else brief  # the same, short where nothing needs fixing
        self.sample_rate = int(manifest["sample_rate"])
        self.window_seconds = float(manifest["window_seconds"])
        self.min_samples = int(manifest.get("min_samples", 1))
        self.embedding_dim = int(manifest["embedding_dim"])
        self.head = head  # the classifier head whose scores `logits` are (None: embeddings only)
        self.output_names = ["embedding"] + (["logits"] if head else [])  # what each window's outputs hold
        self.activation, self.activation_why = (head.activation, head.activation_why) if head else ("softmax", "")

    @classmethod
    def load(
        cls,
        bundle_dir: str | os.PathLike,
        device: str = "auto",
        *,
        threads: int | None = None,
        verify: bool = True,
        variant: str | None = None,
        cpu_engine: str | None = None,
        head: str | None = None,
    ) -> Encoder:
        """Open a bundle folder (or a bare model.onnx with edgeenc metadata).

        `variant` picks a gated reduced-precision CPU file, e.g. "int8dyn" for model.int8dyn.onnx;
        `cpu_engine` ("onnxruntime" or "openvino") the CPU engine (with `variant`: its "fp32" or "bf16").
        Without them the CPU runs the bundle's timed default (`edgeenc optimize`). `head` ("probe" or "model")
        picks the classifier head whose scores `logits` holds; by default an attached probe, else the model's own.
        """
        path = Path(bundle_dir)
        if path.is_file() and path.suffix == ".onnx":
            manifest, bundle = _manifest_from_onnx(path), path.parent
            manifest["variants"] = {}
        else:
            bundle, manifest = path, read_manifest(path)
            if verify:
                problems = verify_bundle(bundle, manifest)
                if problems:
                    raise BundleError(f"{bundle}: " + "; ".join(problems) + " (re-export the bundle)")
        if manifest.get("random_init"):
            warnings.warn(f"{bundle} holds RANDOM weights (exported with --random-init): its embeddings and scores "
                          "mean nothing; every output says random_init true", RandomWeightsWarning, stacklevel=2)
        chosen = choose_head(manifest, head)
        labels = _labels(bundle, chosen) if chosen else None
        skipped: list[BackendUnavailable] = []
        graph_outputs = ["embedding"] + ([chosen.output] if chosen else [])
        backend, log = select_backend(bundle, manifest, graph_outputs, device, threads, variant, skipped,
                                      cpu_engine=cpu_engine)
        return cls(bundle, manifest, backend, labels, log, brief_log(log, skipped), chosen)

    def batch_size(self, options: WindowOptions) -> int:
        """Windows per inference call: the options' own, else the batch `optimize` measured fastest for the variant
        that runs (manifest "throughput"), else DEFAULT_BATCH."""
        return options.batch_size or getattr(self.backend, "best_batch", None) or DEFAULT_BATCH

    @property
    def metadata(self) -> dict[str, str]:
        """What every output file carries about where its numbers came from."""
        m = self.manifest
        return {
            "model_id": str(m.get("model_id")),
            "bundle": str(self.bundle),
            "checkpoint_sha256": str(m.get("checkpoint_sha256")),
            "random_init": str(bool(m.get("random_init"))).lower(),
            "licence": str(m.get("licence")),
            "backend": self.backend.description,
            "sample_rate": str(self.sample_rate),
        }

    def scoring(self, options: ScoreOptions | None = None) -> ScoreOptions:
        """`options` with the head's own activation where none was asked for."""
        return (options or ScoreOptions()).with_activation(self.activation)

    def require_classifier(self) -> None:
        """Raise :class:`NoClassifierHead` (a ValueError) unless the bundle's model has a classifier head."""
        if "logits" not in self.output_names:
            raise NoClassifierHead(self.manifest.get("model_id"))

    def run_batch(self, samples: np.ndarray) -> BatchOutputs:
        """Run equal-length windows [n, samples] at the model's rate. Rows with NaN or infinite samples are not
        run, and rows whose outputs are not finite (samples far outside [-1, 1] overflow the filterbank) are
        not returned: both are listed instead, so that no NaN reaches a table or a results database."""
        finite_in = np.isfinite(samples).all(axis=1)
        ran = np.flatnonzero(finite_in)
        outputs = self.backend.run(samples[ran]) if len(ran) else {}
        if self.head is not None and self.head.output in outputs:  # the chosen head's logits, whichever output
            outputs["logits"] = outputs.pop(self.head.output)
        finite_out = np.ones(len(ran), bool)
        for values in outputs.values():
            finite_out &= np.isfinite(values.reshape(len(ran), -1)).all(axis=1)
        return BatchOutputs(ran[finite_out], {name: v[finite_out] for name, v in outputs.items()},
                            np.flatnonzero(~finite_in), ran[~finite_out])

    def embed(self, samples: np.ndarray, sample_rate: int, options: WindowOptions | None = None,
              **window_fields) -> EmbeddingResult:
        """Embed an in-memory mono (or [n, channels], averaged) signal, resampled to the model's rate.

        `options` (or keyword fields of :class:`WindowOptions`, e.g. ``last="short"``) say how it is cut.
        """
        options = (options or WindowOptions()).updated(**window_fields)
        audio = np.asarray(samples, dtype=np.float32)
        if audio.ndim == 2:
            audio = audio.mean(axis=1)
        if audio.ndim != 1:
            raise ValueError(f"expected mono [n] or [n, channels] samples, got shape {audio.shape}")
        if sample_rate != self.sample_rate:
            import soxr

            audio = soxr.resample(audio, sample_rate, self.sample_rate, quality="HQ").astype(np.float32)
        if len(audio) < self.min_samples:
            raise ValueError(f"{len(audio)} samples is shorter than the model's minimum of {self.min_samples}")
        outcome = next(iter(self._run_files([Stream("<array>", [audio])], options)))
        if outcome.error:
            raise ValueError(outcome.error)
        assert outcome.result is not None
        outcome.result.file = None
        return outcome.result

    def classify(self, samples: np.ndarray, sample_rate: int, scoring: ScoreOptions | None = None,
                 options: WindowOptions | None = None, **fields) -> list[ClassRow]:
        """Top-k labels with scores for each window of an in-memory signal (keyword fields of
        :class:`ScoreOptions` and :class:`WindowOptions` are accepted too, e.g. ``top_k=3``)."""
        self.require_classifier()
        scoring, window_fields = _score_options(scoring, fields)
        return top_k_rows(self.embed(samples, sample_rate, options, **window_fields), self.labels,
                          self.scoring(scoring))

    def classify_file(self, path: str | os.PathLike, scoring: ScoreOptions | None = None,
                      options: WindowOptions | None = None, **fields) -> list[ClassRow]:
        self.require_classifier()
        scoring, window_fields = _score_options(scoring, fields)
        return top_k_rows(self.embed_file(path, options, **window_fields), self.labels, self.scoring(scoring))

    def embed_file(self, path: str | os.PathLike, options: WindowOptions | None = None,
                   **window_fields) -> EmbeddingResult:
        """Embed one recording; raises AudioError for unreadable or bad audio."""
        outcome = next(iter(self.embed_files([path], options, **window_fields)))
        if outcome.error:
            raise AudioError(outcome.path, outcome.error)
        assert outcome.result is not None
        return outcome.result

    def embed_files(self, paths: Sequence[str | os.PathLike], options: WindowOptions | None = None,
                    **window_fields) -> Iterator[FileOutcome]:
        """Embed many recordings, batching windows across files; one outcome per file, in order.

        A bad file yields an outcome with `error` set; the others still complete.
        """
        options = (options or WindowOptions()).updated(**window_fields)
        sources = (Stream(str(p), iter_blocks(p, self.sample_rate, channel=options.channel)) for p in paths)
        yield from self._run_files(sources, options)

    def embed_streams(self, streams: Iterable[Stream], options: WindowOptions) -> Iterator[FileOutcome]:
        """`embed_files` over streams of audio at the model's rate, such as ranges of long files; each outcome is
        named by its stream. Times are relative to each stream's first sample; an AudioError from a stream fails
        only that one. Windows of all streams share batches of `options.batch_size`."""
        yield from self._run_files(streams, options)

    def _run_files(self, sources, options: WindowOptions) -> Iterator[FileOutcome]:
        batcher = WindowBatcher(self.batch_size(options))
        pending: list[_Pending] = []

        def run(batches) -> None:
            for batch in batches:
                live = [i for i, (file_index, _) in enumerate(batch.keys) if file_index >= offset]
                items = {i: pending[batch.keys[i][0] - offset] for i in live}
                rows = [i for i in live if items[i].error is None]
                if not rows:
                    continue
                try:
                    done = self.run_batch(batch.samples[rows])
                except Exception as exc:  # a backend failure must cost only the files in this batch
                    for i in rows:
                        items[i].error = items[i].error or f"inference failed: {type(exc).__name__}: {exc}"
                    continue
                # A non-finite window fails its own file only; the rest of the batch still ran.
                for j in done.nonfinite_input:
                    items[rows[j]].error = items[rows[j]].error or "audio contains NaN or infinite samples"
                for j in done.nonfinite_output:
                    item, window = items[rows[j]], batch.windows[rows[j]]
                    start, end = item.offset + window.start_seconds, item.offset + window.end_seconds
                    item.error = item.error or (
                        f"the model's output is not finite for the window {start:.3f}-{end:.3f} s (samples "
                        f"{round(start * self.sample_rate)}-{round(end * self.sample_rate)} at "
                        f"{self.sample_rate} Hz): sample values far outside [-1, 1]?")
                for out_row, j in enumerate(done.rows):
                    items[rows[j]].outputs[batch.keys[rows[j]][1]] = {k: v[out_row] for k, v in done.outputs.items()}

        offset = 0
        for file_index, stream in enumerate(sources):
            cut = stream.options or options
            item = _Pending(stream.name, offset=stream.offset_seconds)
            pending.append(item)
            try:
                windows = iter_windows(stream.blocks, self.sample_rate, cut.window_seconds or self.window_seconds,
                                       cut.hop_seconds, min_samples=self.min_samples, last=cut.last)
                for window_index, window in enumerate(windows):
                    item.windows.append(Window(window.start_seconds, window.end_seconds, np.empty(0, np.float32)))
                    run(batcher.add((file_index, window_index), window))
                if not item.windows:
                    item.error = f"no window of at least {self.min_samples} samples (the file is too short)"
            except AudioError as exc:
                item.error = exc.reason
            except (ValueError, OSError, RuntimeError) as exc:
                item.error = str(exc)
            item.done_reading = True
            # Flush when nothing else is queued, so results of short runs appear without waiting.
            while pending and _complete(pending[0]):
                yield _finish(pending.pop(0), self)
                offset += 1
        run(batcher.flush())
        for item in pending:
            yield _finish(item, self)


def _score_options(scoring: ScoreOptions | None, fields: dict) -> tuple[ScoreOptions, dict]:
    """`scoring` updated by the ScoreOptions fields among keyword `fields`, and the rest (window fields)."""
    mine = {k: v for k, v in fields.items() if k in _SCORE_FIELDS}
    scoring = replace(scoring or ScoreOptions(), **mine)
    return scoring, {k: v for k, v in fields.items() if k not in _SCORE_FIELDS}


def _complete(item: _Pending) -> bool:
    return item.done_reading and (item.error is not None or len(item.outputs) == len(item.windows))


def _finish(item: _Pending, encoder: Encoder) -> FileOutcome:
    if item.error is not None:
        return FileOutcome(item.path, error=item.error)
    n = len(item.windows)
    starts = np.array([w.start_seconds for w in item.windows], dtype=np.float64)
    ends = np.array([w.end_seconds for w in item.windows], dtype=np.float64)
    emb = np.stack([item.outputs[i]["embedding"] for i in range(n)]).astype(np.float32)
    logits = None
    if "logits" in encoder.output_names:
        logits = np.stack([item.outputs[i]["logits"] for i in range(n)]).astype(np.float32)
    seconds = float(ends.max()) if n else 0.0
    return FileOutcome(item.path, EmbeddingResult(item.path, starts, ends, emb, logits), audio_seconds=seconds)


def top_k_rows(result: EmbeddingResult, labels: Sequence[str] | None, scoring: ScoreOptions) -> list[ClassRow]:
    """The kept labels of every window of `result` as table rows (scores.detections, confirmed over
    `scoring.min_windows` consecutive windows); `scoring` with its activation set (Encoder.scoring)."""
    if result.logits is None:
        raise NoClassifierHead(None)
    found = confirmed(result.starts, result.ends, detections(result.logits, list(labels or []), scoring),
                      scoring.min_windows)
    return [ClassRow(result.file or "", float(result.starts[d.window]), float(result.ends[d.window]), d.rank, d.label,
                     d.score) for d in found]


def file_events(result: EmbeddingResult, labels: Sequence[str] | None, scoring: ScoreOptions) -> list[Event]:
    """The events of one recording (scores.merge_events over its kept detections)."""
    if result.logits is None:
        raise NoClassifierHead(None)
    return merge_events(result.starts, result.ends, detections(result.logits, list(labels or []), scoring),
                        scoring.min_windows)
