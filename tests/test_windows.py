"""Cutting audio into windows (every last-window policy, overlap, gaps, streaming) and batching."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from edgeenc.runtime.windows import Window, WindowBatcher, iter_windows

RATE = 100  # small rate: sample counts are easy to reason about


def ramp(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32)


def spans(windows: list[Window]) -> list[tuple[float, float, int]]:
    return [(w.start_seconds, w.end_seconds, len(w.samples)) for w in windows]


def test_short_last_window_keeps_its_true_length() -> None:
    ws = list(iter_windows([ramp(250)], RATE, 1.0, last="short"))
    assert spans(ws) == [(0.0, 1.0, 100), (1.0, 2.0, 100), (2.0, 2.5, 50)]
    np.testing.assert_array_equal(ws[2].samples, ramp(250)[200:])
    assert all(w.samples.dtype == np.float32 for w in ws)


def test_pad_last_window_is_zero_padded_but_ends_at_the_audio() -> None:
    ws = list(iter_windows([ramp(250)], RATE, 1.0, last="pad"))
    assert spans(ws) == [(0.0, 1.0, 100), (1.0, 2.0, 100), (2.0, 2.5, 100)]
    np.testing.assert_array_equal(ws[2].samples[:50], ramp(250)[200:])
    assert not ws[2].samples[50:].any()


def test_drop_last_window() -> None:
    assert spans(list(iter_windows([ramp(250)], RATE, 1.0, last="drop"))) == [(0.0, 1.0, 100), (1.0, 2.0, 100)]


def test_min_samples_drops_a_tiny_tail() -> None:
    assert len(list(iter_windows([ramp(205)], RATE, 1.0, min_samples=10, last="short"))) == 2
    assert len(list(iter_windows([ramp(210)], RATE, 1.0, min_samples=10, last="short"))) == 3
    assert len(list(iter_windows([ramp(205)], RATE, 1.0, min_samples=10, last="pad"))) == 2


def test_exact_multiple_has_no_partial_window() -> None:
    for last in ("short", "pad", "drop"):
        assert spans(list(iter_windows([ramp(300)], RATE, 1.0, last=last))) == [
            (0.0, 1.0, 100),
            (1.0, 2.0, 100),
            (2.0, 3.0, 100),
        ]


def test_file_shorter_than_one_window() -> None:
    assert spans(list(iter_windows([ramp(42)], RATE, 1.0))) == [(0.0, 0.42, 42)]  # the default keeps it
    assert spans(list(iter_windows([ramp(42)], RATE, 1.0, last="short"))) == [(0.0, 0.42, 42)]
    assert spans(list(iter_windows([ramp(42)], RATE, 1.0, last="pad"))) == [(0.0, 0.42, 100)]
    assert list(iter_windows([ramp(42)], RATE, 1.0, last="drop")) == []


def test_default_drops_a_short_tail_and_keeps_a_long_one() -> None:
    # 10 s windows: a 10.13 s file's 0.13 s tail is dropped, a 15 s file's 5 s tail (exactly half) kept
    assert spans(list(iter_windows([ramp(1013)], RATE, 10.0))) == [(0.0, 10.0, 1000)]
    assert spans(list(iter_windows([ramp(1500)], RATE, 10.0))) == [(0.0, 10.0, 1000), (10.0, 15.0, 500)]
    assert len(list(iter_windows([ramp(1499)], RATE, 10.0))) == 1  # just under half the window
    # 5 s windows (sed_birdcode's): a 9 s file's 4 s tail is kept at its true length
    assert spans(list(iter_windows([ramp(900)], RATE, 5.0))) == [(0.0, 5.0, 500), (5.0, 9.0, 400)]
    # 1.5 s windows: a 0.9 s tail is over half the window but under 1 s, so it goes too
    assert spans(list(iter_windows([ramp(240)], RATE, 1.5))) == [(0.0, 1.5, 150)]
    assert len(list(iter_windows([ramp(250)], RATE, 1.5))) == 2  # a 1.0 s tail stays
    # the other policies keep their meaning on the same 10.13 s file
    assert spans(list(iter_windows([ramp(1013)], RATE, 10.0, last="short")))[-1] == (10.0, 10.13, 13)
    assert spans(list(iter_windows([ramp(1013)], RATE, 10.0, last="pad")))[-1] == (10.0, 10.13, 1000)
    assert len(list(iter_windows([ramp(1013)], RATE, 10.0, last="drop"))) == 1


def test_default_keeps_a_file_shorter_than_a_window_however_short() -> None:
    assert spans(list(iter_windows([ramp(13)], RATE, 10.0))) == [(0.0, 0.13, 13)]
    assert list(iter_windows([ramp(13)], RATE, 10.0, min_samples=20)) == []  # below the model's minimum
    # windows asked for under 1 s are kept; only the final partial one is judged
    assert spans(list(iter_windows([ramp(120)], RATE, 0.5))) == [(0.0, 0.5, 50), (0.5, 1.0, 50)]


def test_no_audio_no_windows() -> None:
    assert list(iter_windows([], RATE, 1.0)) == []
    assert list(iter_windows([np.zeros(0, np.float32)], RATE, 1.0)) == []


def test_overlapping_hop() -> None:
    ws = list(iter_windows([ramp(250)], RATE, 1.0, 0.5))
    assert spans(ws) == [(0.0, 1.0, 100), (0.5, 1.5, 100), (1.0, 2.0, 100), (1.5, 2.5, 100)]
    for w in ws:
        np.testing.assert_array_equal(w.samples, ramp(250)[int(w.start_seconds * RATE) :][: len(w.samples)])


def test_overlapping_hop_partial_window_only_when_it_adds_samples() -> None:
    # 260 samples: last full window [150, 250); [200, 260) adds samples 250..259.
    ws = list(iter_windows([ramp(260)], RATE, 1.0, 0.5, last="short"))
    assert spans(ws)[-1] == (2.0, 2.6, 60)
    assert len(ws) == 5


def test_gapped_hop() -> None:
    ws = list(iter_windows([ramp(520)], RATE, 1.0, 1.5, last="short"))
    assert spans(ws) == [(0.0, 1.0, 100), (1.5, 2.5, 100), (3.0, 4.0, 100), (4.5, 5.2, 70)]
    np.testing.assert_array_equal(ws[3].samples, ramp(520)[450:])


def test_gapped_hop_tail_inside_a_gap_is_not_a_window() -> None:
    # Audio ends at 4.2 s, inside the gap between [3.0, 4.0) and the next start at 4.5 s.
    assert spans(list(iter_windows([ramp(420)], RATE, 1.0, 1.5)))[-1] == (3.0, 4.0, 100)


@pytest.mark.parametrize("hop", [None, 0.37, 1.0, 1.9])
@pytest.mark.parametrize("last", ["auto", "short", "pad", "drop"])
def test_streaming_over_random_blocks_equals_one_block(hop: float | None, last: str) -> None:
    rng = np.random.default_rng(7)
    audio = rng.standard_normal(1234).astype(np.float32)
    whole = list(iter_windows([audio], RATE, 1.0, hop, last=last))
    cuts = np.sort(rng.integers(0, len(audio), size=40))
    blocks = np.split(audio, cuts)  # includes empty and tiny blocks
    streamed = list(iter_windows(iter(blocks), RATE, 1.0, hop, last=last))
    assert spans(streamed) == spans(whole)
    for a, b in zip(streamed, whole, strict=True):
        np.testing.assert_array_equal(a.samples, b.samples)


def test_windows_do_not_pin_the_stream_buffer() -> None:
    ws = list(iter_windows([ramp(250)], RATE, 1.0))
    assert all(w.samples.base is None for w in ws)


def test_buffer_stays_bounded() -> None:
    rate, block = 16000, 8000
    n_blocks = 300  # 150 s, ~9.6 MB of float32 if it were all kept

    def blocks():
        for _ in range(n_blocks):
            yield np.ones(block, np.float32)

    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_windows(blocks(), rate, 1.0, 0.5))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n_blocks - 1  # starts every 0.5 s; the last full one ends with the audio
    assert peak < 10 * (rate + block) * 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window_seconds": 0.0}, "window"),
        ({"window_seconds": 1.0, "hop_seconds": 0.0}, "hop"),
        ({"window_seconds": 1.0, "hop_seconds": -1.0}, "hop"),
        ({"window_seconds": 1.0, "last": "wrap"}, "last must be one of"),
        ({"window_seconds": 1.0, "min_samples": 0}, "min_samples"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        list(iter_windows([ramp(10)], RATE, **kwargs))


def test_two_dimensional_block_is_rejected() -> None:
    with pytest.raises(ValueError, match="1-D mono"):
        list(iter_windows([np.zeros((10, 2), np.float32)], RATE, 1.0))


def window(n: int, start: float = 0.0, fill: float = 0.0) -> Window:
    return Window(start, start + n / RATE, np.full(n, fill, np.float32))


def test_batcher_groups_by_length_and_respects_batch_size() -> None:
    batcher = WindowBatcher(3)
    assert batcher.add(("a", 0), window(100, fill=1)) == []
    assert batcher.add(("a", 1), window(100, fill=2)) == []
    assert batcher.add(("a", 2), window(40)) == []
    assert len(batcher) == 3
    (full,) = batcher.add(("b", 0), window(100, fill=3))
    assert full.keys == [("a", 0), ("a", 1), ("b", 0)]
    assert full.samples.shape == (3, 100) and full.samples.dtype == np.float32
    np.testing.assert_array_equal(full.samples[:, 0], [1, 2, 3])
    assert [w.samples[0] for w in full.windows] == [1, 2, 3]
    assert len(batcher) == 1


def test_batcher_flush_returns_the_rest_by_length() -> None:
    batcher = WindowBatcher(4)
    for i in range(5):
        batcher.add(("a", i), window(100))
    batcher.add(("a", 5), window(37))
    batcher.add(("b", 0), window(100))
    batcher.add(("b", 1), window(12))
    rest = batcher.flush()
    assert [b.samples.shape for b in rest] == [(2, 100), (1, 37), (1, 12)]
    assert rest[0].keys == [("a", 4), ("b", 0)]
    assert batcher.flush() == [] and len(batcher) == 0


def test_batcher_never_mixes_lengths() -> None:
    rng = np.random.default_rng(1)
    batcher = WindowBatcher(5)
    batches = []
    for i, n in enumerate(rng.choice([100, 60, 7], size=50)):
        batches += batcher.add(i, window(int(n)))
    batches += batcher.flush()
    assert sum(len(b.keys) for b in batches) == 50
    assert all(len(b.keys) <= 5 and len(set(len(w.samples) for w in b.windows)) == 1 for b in batches)
    assert sorted(k for b in batches for k in b.keys) == list(range(50))


def test_batcher_rejects_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        WindowBatcher(0)
