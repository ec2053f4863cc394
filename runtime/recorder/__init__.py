"""The recorder: `watch` (recordings landing in a folder) and `listen` (a live source) into one crash-safe
SQLite results file with its nearest-neighbour index, and what reads it back (`export-db`, `search`). Built on
the core's Encoder; no other wing is imported."""

from .listen import ListenSummary, listen
from .live_store import LiveStore
from .page import app as page_app
from .page import open_read_only
from .review import event_clips
from .search import search_store, stored_window
from .sources import PCM_FORMATS, Source, SourceError, open_source
from .store import FileInfo, Store, StoredEvent, StoreError, StoreLocked, export_events, export_table
from .store_index import index_folder, keep_index, rebuild_store_index
from .watch import WatchSummary, watch

__all__ = ["PCM_FORMATS", "FileInfo", "ListenSummary", "LiveStore", "Source", "SourceError", "Store", "StoreError",
           "StoreLocked", "StoredEvent", "WatchSummary", "event_clips", "export_events", "export_table", "index_folder",
           "keep_index", "listen", "open_read_only", "open_source", "page_app", "rebuild_store_index", "search_store",
           "stored_window", "watch"]
