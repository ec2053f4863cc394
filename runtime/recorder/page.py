"""`edgeenc serve`: a small local web page over a results file, read-only, beside a running watch or listen.

It shows the station's health (last window, windows, dropped audio, source restarts, what computes the
rows), the latest events with a spectrogram and a player for each, and the events per label per hour of
the last day as a chart. Pages are made on the server (Starlette; no JavaScript, no build step); the
database is opened read-only per request (SQLite `mode=ro` over WAL: it never blocks the writer); clips
and spectrograms are cut when asked for. Needs the `serve` extra (starlette, uvicorn, pillow).
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import os
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf

from ..audio import AudioError
from .review import live_clip
from .store import Store, StoredEvent, StoreError

LATEST = 20  # events on the page
RECENT_WINDOWS = 50_000  # newest windows the page derives events from (a season's file stays fast)
CLIP_MARGIN = 0.5
PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


def open_read_only(path: str | os.PathLike) -> Store:
    """The results file for reading only: SQLite refuses any write, and a reader never blocks the writer."""
    if not os.path.isfile(path):
        raise StoreError(f"{path}: no such results file")
    try:
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        store = Store(os.fspath(path), conn, None)
        if not store.meta().get("bundle_hash"):
            raise StoreError(f"{path}: not an edgeenc results file (written by `edgeenc watch` or `listen`)")
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: cannot be read as a results file ({exc})") from None
    return store


def health(store: Store) -> dict[str, str]:
    q = store.conn.execute
    timed = bool(q("SELECT 1 FROM sqlite_master WHERE name = 'streams'").fetchone())
    last = (q("SELECT max(utc_start) FROM window_times").fetchone()[0] if timed else None) or \
        q("SELECT max(processed_at) FROM files WHERE status = 'done'").fetchone()[0]
    dropped, restarts = q("SELECT coalesce(sum(dropped_seconds), 0), coalesce(sum(restarts), 0) FROM streams"
                          ).fetchone() if timed else (0.0, 0)
    meta = store.meta()
    return {"results file": store.path, "model": str(meta.get("model_id")),
            "random weights": "YES: the scores mean nothing" if meta.get("random_init") == "true" else "no",
            "last window": str(last or "none yet"), "windows": str(q("SELECT count(*) FROM windows").fetchone()[0]),
            "files failed": str(q("SELECT count(*) FROM files WHERE status = 'failed'").fetchone()[0]),
            "dropped audio": f"{dropped:.1f} s", "source restarts": str(restarts),
            "computed by": "; ".join(store.variants()) or "nothing yet"}


def event_time(store: Store, event: StoredEvent) -> _dt.datetime | None:
    """When an event was heard (live) or its recording was processed (watch), UTC."""
    when = event.utc_start or store.conn.execute("SELECT processed_at FROM files WHERE id = ?",
                                                 (event.file_id,)).fetchone()[0]
    try:
        return _dt.datetime.fromisoformat(when) if when else None
    except ValueError:
        return None


def clip_audio(store: Store, event: StoredEvent) -> tuple[np.ndarray, int]:
    """The event's audio (with a margin for recordings); AudioError when its source is gone."""
    if event.path.startswith("live:"):
        with tempfile.TemporaryDirectory() as tmp:
            clip = live_clip(store, event, Path(tmp))
            return sf.read(clip.path, dtype="float32")
    if not os.path.isfile(event.path):
        raise AudioError(event.path, "the recording is no longer there (moved or deleted)")
    with sf.SoundFile(event.path) as f:
        rate = f.samplerate
        first = max(0, int((event.start - CLIP_MARGIN) * rate))
        f.seek(first)
        samples = f.read(int((event.end - event.start + 2 * CLIP_MARGIN) * rate), dtype="float32")
    return samples, rate


def spectrogram_png(samples: np.ndarray, rate: int, height: int = 128, width: int = 480) -> bytes:
    """A log-power spectrogram as a PNG (time left to right, low frequencies at the bottom)."""
    from PIL import Image

    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    n_fft, hop = 512, 128
    if len(mono) < n_fft:
        mono = np.pad(mono, (0, n_fft - len(mono)))
    frames = np.lib.stride_tricks.sliding_window_view(mono, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    db = 10 * np.log10(power + 1e-12)
    db = np.clip((db - (db.max() - 80.0)) / 80.0, 0.0, 1.0)  # the top 80 dB
    anchors = np.array([[20, 12, 40], [90, 30, 110], [220, 80, 60], [250, 200, 60], [255, 255, 210]], float)
    ramp = np.stack([np.interp(db, np.linspace(0, 1, len(anchors)), anchors[:, c]) for c in range(3)], axis=-1)
    image = Image.fromarray(ramp.astype(np.uint8).transpose(1, 0, 2)[::-1]).resize((width, height))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def hourly_chart(counts: dict[str, Counter], hours: list[_dt.datetime]) -> str:
    """An inline SVG of stacked bars: events per label per hour."""
    labels = sorted(counts, key=lambda label: -sum(counts[label].values()))[: len(PALETTE)]
    width, height, pad = 24 * 26 + 60, 220, 30
    peak = max([sum(counts[label][h] for label in labels) for h in hours] + [1])
    parts = [f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 60}" '
             f'role="img" aria-label="events per label per hour">']
    for i, hour in enumerate(hours):
        y = height
        for label, colour in zip(labels, PALETTE):
            n = counts[label][hour]
            if n:
                h = (height - pad) * n / peak
                y -= h
                parts.append(f'<rect x="{40 + i * 26}" y="{y:.1f}" width="22" height="{h:.1f}" fill="{colour}">'
                             f"<title>{html.escape(label)}: {n} at {hour:%H}:00</title></rect>")
        if i % 3 == 0:
            parts.append(f'<text x="{40 + i * 26}" y="{height + 14}" font-size="10">{hour:%H}h</text>')
    parts.append(f'<text x="0" y="{pad - 8}" font-size="10">{peak}</text>')
    for i, (label, colour) in enumerate(zip(labels, PALETTE)):
        parts.append(f'<rect x="{40 + (i % 4) * 160}" y="{height + 24 + (i // 4) * 14}" width="10" height="10" '
                     f'fill="{colour}"/><text x="{54 + (i % 4) * 160}" y="{height + 33 + (i // 4) * 14}" '
                     f'font-size="11">{html.escape(label[:24])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render(store: Store) -> str:
    events = store.events(recent_windows=RECENT_WINDOWS)
    now = _dt.datetime.now(_dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
    hours = [now - _dt.timedelta(hours=23 - i) for i in range(24)]
    counts: dict[str, Counter] = {}
    timed = [(event_time(store, e), e) for e in events]
    for when, event in timed:
        if when is not None and when >= hours[0]:
            counts.setdefault(event.label, Counter())[when.replace(minute=0, second=0, microsecond=0)] += 1
    latest = sorted(timed, key=lambda pair: (pair[0] or _dt.datetime.min.replace(tzinfo=_dt.timezone.utc),
                                             pair[1].file_id, pair[1].start), reverse=True)[:LATEST]
    rows = []
    for when, event in latest:
        where = html.escape(event.path if event.path.startswith("live:") else Path(event.path).name)
        gone = not event.path.startswith("live:") and not os.path.isfile(event.path)
        media = (f'<td colspan="2" class="gone">recording {html.escape(event.path)} is no longer there</td>' if gone
                 else f'<td><img class="spectrogram" alt="spectrogram" src="/spectrogram/{event.id}.png"></td>'
                      f'<td><audio controls preload="none" src="/clip/{event.id}.wav"></audio></td>')
        rows.append(f'<tr class="event" id="event-{event.id}"><td>{html.escape(str(when or "")[:19])}</td>'
                    f"<td>{where}<br>{event.start:.1f}-{event.end:.1f} s</td>"
                    f'<td class="label">{html.escape(event.label)}</td><td>{event.max_score:.3f}</td>'
                    f"<td>{event.windows}</td>{media}</tr>")
    station = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in health(store).items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeenc: {html.escape(Path(store.path).name)}</title>
<meta http-equiv="refresh" content="60">
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{padding:3px 8px;text-align:left;border-bottom:1px solid #ddd}} .spectrogram{{height:64px;width:240px}}
.gone{{color:#a00}}</style></head>
<body><h1>edgeenc station</h1>
<h2>Health</h2><table id="health">{station}</table>
<h2>Events per label per hour, last 24 h (UTC)</h2>{hourly_chart(counts, hours)}
<h2>Latest events</h2>
<table id="events"><tr><th>time (UTC)</th><th>where</th><th>label</th><th>max score</th><th>windows</th>
<th>spectrogram</th><th>listen</th></tr>{"".join(rows) or '<tr><td colspan="7">no events yet</td></tr>'}</table>
</body></html>"""


def app(db: str | os.PathLike):
    """The Starlette application serving the page of results file `db`."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Route

    def with_store(handler):
        def endpoint(request):
            try:
                store = open_read_only(db)
            except StoreError as exc:
                return PlainTextResponse(str(exc), status_code=503)
            try:
                return handler(request, store)
            finally:
                store.close()
        return endpoint

    def find(store: Store, event_id: str) -> StoredEvent | None:
        return next((e for e in store.events(recent_windows=RECENT_WINDOWS) if e.id == event_id), None)

    def media(kind: str):
        def handler(request, store):
            event = find(store, request.path_params["event"])
            if event is None:
                return PlainTextResponse("no such event (the page may be older than the results file)", 404)
            try:
                samples, rate = clip_audio(store, event)
            except AudioError as exc:
                return PlainTextResponse(str(exc), status_code=404)
            if kind == "png":
                return Response(spectrogram_png(samples, rate), media_type="image/png")
            buf = io.BytesIO()
            sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
            return Response(buf.getvalue(), media_type="audio/wav")
        return handler

    return Starlette(routes=[
        Route("/", with_store(lambda request, store: HTMLResponse(render(store)))),
        Route("/spectrogram/{event}.png", with_store(media("png"))),
        Route("/clip/{event}.wav", with_store(media("wav"))),
    ])
