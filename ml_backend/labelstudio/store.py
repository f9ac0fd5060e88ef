"""A small SQLite store under MODEL_DIR for the webhook events Label Studio sends (for later training)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    action TEXT NOT NULL,
    project_id INTEGER,
    task_id INTEGER,
    annotation_id INTEGER,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_project ON events (project_id, action);
"""


class EventStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def record(self, action: str, project_id, task_id, annotation_id, payload: dict) -> int:
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO events (received_at, action, project_id, task_id, annotation_id, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), action, project_id, task_id, annotation_id, json.dumps(payload)),
            )
            return int(cursor.lastrowid)

    def events(self, project_id: int | None = None, action: str | None = None) -> list[dict]:
        query, args = "SELECT id, received_at, action, project_id, task_id, annotation_id, payload FROM events", []
        where = []
        if project_id is not None:
            where.append("project_id = ?")
            args.append(project_id)
        if action is not None:
            where.append("action = ?")
            args.append(action)
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        keys = ("id", "received_at", "action", "project_id", "task_id", "annotation_id", "payload")
        return [dict(zip(keys, row[:-1] + (json.loads(row[-1]),))) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT action, COUNT(*) FROM events GROUP BY action").fetchall())

    def close(self) -> None:
        self._db.close()
