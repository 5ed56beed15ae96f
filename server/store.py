"""Task state in SQLite (``OUTPUT_BASE_PATH/tasks.sqlite3``), so results survive a restart.

One connection shared by the request handlers and the worker, serialised by a lock; WAL keeps each commit durable
and cheap. JSON columns hold the (redacted) request, the outputs and the metadata.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from datetime import datetime, timezone

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    error TEXT,
    request TEXT NOT NULL,
    outputs TEXT,
    metadata TEXT
)
"""
#: columns added after the first release, with their SQL type: an older database gets them on open
_ADDED_COLUMNS = {"attempts": "INTEGER NOT NULL DEFAULT 0", "job": "TEXT", "outputs_deleted_at": "TEXT"}
_JSON_COLUMNS = ("request", "outputs", "metadata", "job")
_COLUMNS = ("status", "started_at", "finished_at", "error", "outputs", "metadata", "job", "outputs_deleted_at")
UNFINISHED = ("in_queue", "in_progress")


def utc_now() -> str:
    """ISO-8601 UTC with a ``Z`` suffix (the reference emits a malformed ``+00:00Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TaskStore:
    """Tasks by id.

    Args:
        path (str): the SQLite file; its folder is created.
    """

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        present = {row["name"] for row in self._db.execute("PRAGMA table_info(tasks)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, task_id: str, model: str, request: dict, created_at: str, job: dict | None = None) -> None:
        """Store a queued task: ``request`` as shown to clients (redacted), ``job`` what the worker needs to run it
        again after a restart."""
        with self._lock:
            self._db.execute(
                "INSERT INTO tasks (id, status, model, created_at, request, job) VALUES (?, 'in_queue', ?, ?, ?, ?)",
                (task_id, model, created_at, json.dumps(request), None if job is None else json.dumps(job)),
            )

    def start(self, task_id: str) -> int:
        """Mark the task running and count the attempt; returns the attempt number (1 for the first run)."""
        with self._lock:
            self._db.execute("UPDATE tasks SET status = 'in_progress', started_at = ?, attempts = attempts + 1 "
                             "WHERE id = ?", (utc_now(), task_id))
            return self._db.execute("SELECT attempts FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]

    def unfinished(self) -> list[dict]:
        """Queued or running tasks (left by a previous run), oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM tasks WHERE status IN {UNFINISHED} ORDER BY seq").fetchall()
        return [_decode(r) for r in rows]

    def with_outputs(self) -> list[dict]:
        """Finished tasks whose output files are still kept, oldest finished first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM tasks WHERE outputs IS NOT NULL AND outputs_deleted_at IS NULL "
                                    "ORDER BY finished_at, seq").fetchall()
        return [_decode(r) for r in rows]

    def update(self, task_id: str, **fields) -> None:
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"Unknown task column(s) {sorted(unknown)}; use {', '.join(_COLUMNS)}.")
        values = [json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in fields.items()]
        with self._lock:
            self._db.execute(f"UPDATE tasks SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", (*values, task_id))

    def get(self, task_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else _decode(row)

    def list(self, limit: int, offset: int, status: str | None = None) -> tuple[list[dict], int]:
        """Newest first; returns (rows, total matching)."""
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM tasks {where}", args).fetchone()[0]
            rows = self._db.execute(f"SELECT * FROM tasks {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                                    (*args, limit, offset)).fetchall()
        return [_decode(r) for r in rows], total



def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in _JSON_COLUMNS:
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out
