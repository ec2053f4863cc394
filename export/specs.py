"""Per-architecture export facts that both the export (torch) and the engine gate (no torch) need."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportSpec:
    """Parity lengths (seconds of audio) and the trace length of one architecture."""

    arch: str
    parity_seconds: tuple[float, ...]
    batch3_seconds: tuple[float, ...]  # lengths also checked at batch 3
    trace_seconds: float


EXPORT_SPECS = {
    "beats": ExportSpec("beats", (1.0, 3.3, 10.0, 30.0), (1.0, 3.3, 10.0), trace_seconds=3.3),
    "eat": ExportSpec("eat", (4.0, 10.0, 14.0), (4.0, 10.0), trace_seconds=4.0),
}
