"""The recorder: `watch` (recordings landing in a folder) and `listen` (a live source) into one crash-safe
SQLite results file, and what reads it back (`export-db`, `search`). Built on the core's Encoder; no other
wing is imported."""

from .listen import ListenSummary, listen
from .live_store import LiveStore
from .page import app as page_app
from .page import open_read_only
from .review import event_clips
from .sources import PCM_FORMATS, Source, SourceError, open_source
from .store import FileInfo, Store, StoredEvent, StoreError, StoreLocked, export_events, export_table
from .watch import WatchSummary, watch

__all__ = ["PCM_FORMATS", "FileInfo", "ListenSummary", "LiveStore", "Source", "SourceError", "Store", "StoreError",
           "StoreLocked", "StoredEvent", "WatchSummary", "event_clips", "export_events", "export_table", "listen",
           "open_read_only", "open_source", "page_app", "watch"]
