"""Opening a database file read-only, for viewers that must never write it (stdlib only, so that
``tokentop status`` can use it without loading the store)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def connect_readonly(path: Path, timeout: float = 10.0) -> sqlite3.Connection:
    """A ``mode=ro`` connection to an existing file.

    In a folder this process cannot write, SQLite cannot make the WAL's shared-memory file and
    refuses even to read; there it opens with ``immutable=1`` when no write-ahead log is left
    beside the file (so that the file alone is the whole database).

    Raises:
        sqlite3.Error: the file cannot be read as a database.
    """
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=timeout)
    try:
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        wal = path.with_name(path.name + "-wal")
        if (wal.exists() and wal.stat().st_size > 0) or os.access(path.parent, os.W_OK):
            raise
    return sqlite3.connect(f"{uri}&immutable=1", uri=True, check_same_thread=False, timeout=timeout)
