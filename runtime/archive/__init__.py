"""Archives on many workers: the plan (files cut into ranges of windows), Ray Data over the core's Encoder,
Parquet shards written exactly once per file, and recordings named by URL (s3://, gs://, file://).

`RayOptions`, `ray_session` and `run_on_ray` import Ray when first used (the `ray` extra); the rest does not.
"""

from .plan import ArchiveError, ArchiveOutput, ArchivePlan, Recording, list_recordings, plan_archive
from .urls import is_url, iter_source_blocks, probe_source

_ON_RAY = ("RayOptions", "ray_session", "run_on_ray")

__all__ = ["ArchiveError", "ArchiveOutput", "ArchivePlan", "Recording", "is_url", "iter_source_blocks",
           "list_recordings", "plan_archive", "probe_source", *_ON_RAY]


def __getattr__(name: str):
    if name in _ON_RAY:  # only `--engine ray` pays for importing Ray
        from . import ray_run

        return getattr(ray_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
