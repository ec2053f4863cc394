"""Archives on many workers: the plan (files cut into ranges of windows), Ray Data over the core's Encoder,
Parquet shards written exactly once per file, recordings named by URL (s3://, gs://, file://), and the
nearest-neighbour index and search over the shards.

`RayOptions`, `ray_session` and `run_on_ray` import Ray when first used (the `ray` extra); the rest does not.
"""

from .index import (
    Shard,
    archive_index_folder,
    archive_window,
    index_archive,
    is_archive,
    search_archive,
    shard_list,
)
from .plan import ArchiveError, ArchiveOutput, ArchivePlan, Recording, list_recordings, plan_archive
from .urls import is_url, iter_source_blocks, probe_source

_ON_RAY = ("RayOptions", "ray_session", "run_on_ray")

__all__ = ["ArchiveError", "ArchiveOutput", "ArchivePlan", "Recording", "Shard", "archive_index_folder",
           "archive_window", "index_archive", "is_archive", "is_url", "iter_source_blocks", "list_recordings",
           "plan_archive", "probe_source", "search_archive", "shard_list", *_ON_RAY]


def __getattr__(name: str):
    if name in _ON_RAY:  # only `--engine ray` pays for importing Ray
        from . import ray_run

        return getattr(ray_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
