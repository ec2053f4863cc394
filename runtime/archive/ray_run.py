"""Archive runs on Ray Data (`edgeenc embed|classify --engine ray`), over the same Encoder.

This module imports ray, so only `--engine ray` imports it (`pip install "edgeenc[ray]"`).

The pipeline: the plan's ranges (plan.py) become a dataset; `map_batches` runs them through
:class:`EncoderActor`, which holds one Encoder (one ONNX Runtime session, loaded once per actor) and
decodes and resamples its ranges itself, so no audio crosses the object store; the driver gathers each
file's ranges and commits whole files to Parquet shards. One committer is what keeps the output
exactly-once: a shard only ever holds files whose every range has arrived.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.data

from ..encoder import EmbeddingResult, Encoder, FileOutcome, Stream
from ..ranges import join_ranges
from ..windows import WindowOptions
from .plan import ArchiveOutput, ArchivePlan, Recording
from .urls import iter_source_blocks

GPU_DEVICES = ("cuda", "trt")


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray on this machine
    workers: int = 1  # actors, each with one Encoder
    threads_per_worker: int = 1  # ONNX Runtime threads (and Ray CPUs) per actor
    device: str = "auto"
    variant: str | None = None
    cpu_engine: str | None = None
    head: str | None = None  # the classifier head (Encoder.load's `head`)
    ranges_per_batch: int = 8  # ranges handed to an actor at once
    shard_files: int = 64  # files per Parquet shard: what a kill can cost at most


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray with at least `num_cpus` CPUs.

    A session this process is already connected to is used and left as it was.
    """
    given = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        yield
        return
    if address:
        check_reachable(address, given)
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    # The commands print their own progress; Ray Data's would interleave with it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if address:
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as exc:
            raise ConnectionError(f"cannot join the Ray cluster at {address} ({given}): {exc}") from None
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_cpus or 1), include_dashboard=False, **quiet)
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, given: str, timeout: float = 5.0) -> None:
    """ConnectionError at once when a host:port (or ray://host:port) cluster address does not answer; Ray itself
    retries for tens of seconds first."""
    found = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address)
    if not found:
        return  # "auto", "local" and other forms Ray resolves itself
    try:
        socket.create_connection((found.group(1), int(found.group(2))), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address} ({given}): {exc.strerror or exc}; start "
                              "it (ray start --head) or correct the address") from None


class EncoderActor:
    """A Ray Data worker: one Encoder; each call embeds a batch of ranges into one row per range."""

    def __init__(self, bundle: str, device: str, threads: int, variant: str | None, cpu_engine: str | None,
                 options: WindowOptions, head: str | None = None) -> None:
        self.encoder = Encoder.load(bundle, device, threads=threads, variant=variant, cpu_engine=cpu_engine, head=head)
        self.options = options

    def _blocks(self, path: str, start: int, stop: int | None):
        return iter_source_blocks(path, self.encoder.sample_rate, channel=self.options.channel, start=start,
                                  stop=None if stop < 0 else stop)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["path"])
        outcomes: dict[int, FileOutcome] = {}
        # Interior ranges hold whole windows only; the run's policy is for the end of the file.
        rate = self.encoder.sample_rate
        streams = (Stream(str(i), self._blocks(str(batch["path"][i]), int(batch["start"][i]), int(batch["stop"][i])),
                          self.options if batch["stop"][i] < 0 else self.options.updated(last="drop"),
                          int(batch["start"][i]) / rate) for i in range(n))
        for outcome in self.encoder.embed_streams(streams, self.options):
            outcomes[int(outcome.path)] = outcome
        results = [outcomes[i].result for i in range(n)]
        empty = np.zeros(0, np.float32)
        return pa.table({
            "path": pa.array([str(p) for p in batch["path"]], pa.string()),
            "index": pa.array(batch["index"], pa.int64()),
            "count": pa.array(batch["count"], pa.int64()),
            "start": pa.array(batch["start"], pa.int64()),
            "error": pa.array([outcomes[i].error for i in range(n)], pa.string()),
            "starts": pa.array([empty if r is None else r.starts for r in results], pa.list_(pa.float64())),
            "ends": pa.array([empty if r is None else r.ends for r in results], pa.list_(pa.float64())),
            "embedding": pa.array([empty if r is None else r.embeddings.reshape(-1) for r in results],
                                  pa.list_(pa.float32())),
            "logits": pa.array([empty if r is None or r.logits is None else r.logits.reshape(-1) for r in results],
                               pa.list_(pa.float32())),
        })


def _gpus_per_worker(device: str) -> float:
    if device in GPU_DEVICES:
        return 1
    if device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1:
        return 1
    return 0


def _range_results(table: pa.Table) -> Iterator[tuple[dict, EmbeddingResult | None]]:
    """(row of path, index, count, start, error; its result) for each range in an actor's output."""
    meta = table.select(["path", "index", "count", "start", "error"]).to_pylist()
    lists = {name: table.column(name).combine_chunks() for name in ("starts", "ends", "embedding", "logits")}
    for i, row in enumerate(meta):
        if row["error"] is not None:
            yield row, None
            continue
        starts, ends, embedding, logits = (np.asarray(lists[name][i].values) for name in lists)
        yield row, EmbeddingResult(row["path"], starts, ends, embedding.reshape(len(starts), -1),
                                   logits.reshape(len(starts), -1) if len(logits) else None)


def run_on_ray(plan: ArchivePlan, output: ArchiveOutput, bundle: str, options: RayOptions) -> Iterator[FileOutcome]:
    """Run the plan in a connected Ray session; one outcome per file, yielded once its shard is written.

    Workers cut windows with the plan's options. Failures are reported as they come and written to
    failures.parquet at the end (also those found while planning). Outcomes and failures name files as they
    were given.
    """
    recordings = {r.path: r for r in plan.recordings}
    failures = dict(plan.failures)
    for path, error in plan.failures.items():
        yield FileOutcome(recordings[path].name, error=error)
    pending: list[tuple[Recording, EmbeddingResult]] = []

    def commit() -> Iterator[FileOutcome]:
        if pending:
            output.write_shard(pending)
        for recording, result in pending:
            yield FileOutcome(recording.name, result, audio_seconds=float(result.ends.max()))
        pending.clear()

    if plan.ranges:
        rows = [{**asdict(r), "stop": -1 if r.stop is None else r.stop} for r in plan.ranges]
        actor_args = {"bundle": str(bundle), "device": options.device, "threads": options.threads_per_worker,
                      "variant": options.variant, "cpu_engine": options.cpu_engine, "options": plan.options,
                      "head": options.head}
        dataset = ray.data.from_items(rows).map_batches(
            EncoderActor, fn_constructor_kwargs=actor_args, batch_size=options.ranges_per_batch,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_cpus=options.threads_per_worker,
            num_gpus=_gpus_per_worker(options.device))
        gathered: dict[str, dict[int, tuple[int, EmbeddingResult]]] = {}
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            for row, result in _range_results(table):
                path = row["path"]
                if path in failures:
                    continue  # another range of it failed already
                if result is None:
                    failures[path] = row["error"]
                    gathered.pop(path, None)
                    yield FileOutcome(recordings[path].name, error=row["error"])
                    continue
                parts = gathered.setdefault(path, {})
                parts[row["index"]] = (row["start"], result)
                if len(parts) == row["count"]:
                    ordered = [parts.pop(i) for i in range(row["count"])]
                    del gathered[path]
                    joined = join_ranges(path, [r for _, r in ordered], [s for s, _ in ordered], plan.sample_rate)
                    pending.append((recordings[path], joined))
                    if len(pending) >= options.shard_files:
                        yield from commit()
    yield from commit()
    output.write_failures({recordings[path].name: error for path, error in failures.items()})
