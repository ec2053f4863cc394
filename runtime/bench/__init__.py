"""`edgeenc bench`: latency, real-time factor, throughput, cold start and memory of every backend and
variant that runs here, each against the GEMM limit of its own precision measured in the same run; and
the timing loop `optimize` ranks CPU variants with. Uses the backends' face; no other wing."""

from .flops import count_flops
from .gemm_limits import apply_limits, limit_for, measure_limits, merge_limits
from .machine import gemm_gflops, machine_info
from .run import (
    Target,
    batch_sweep,
    bench_audio,
    cold_start,
    cpu_variants,
    format_table,
    load_target,
    peak_rss_mb,
    percentiles,
    report_json,
    run_bench,
    time_interleaved,
)

__all__ = ["Target", "apply_limits", "batch_sweep", "bench_audio", "cold_start", "count_flops", "cpu_variants",
           "format_table", "gemm_gflops", "limit_for", "load_target", "machine_info", "measure_limits",
           "merge_limits", "peak_rss_mb", "percentiles", "report_json", "run_bench", "time_interleaved"]
