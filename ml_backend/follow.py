"""A durable work queue for data that keeps arriving (tool-neutral): task ids of a project go in when a tool says they
exist (a webhook, a poll) and come out in batches for the same pre-annotation path as a whole-project run.

SQLite under MODEL_DIR, one row per (source, project, task): an id enqueued twice is one row, and a task done stays
done, so a repeated or replayed event predicts nothing twice. `enqueue` returns only after the rows are committed: a
caller that acknowledges an event after it (HTTP 2xx) loses none on a crash. Rows being worked on when the process
died go back to the queue at the next start. A batch whose tool was unreachable is retried later with exponential
backoff (`retry`); a task that fails for a reason of its own is `done` with its error (the next whole-project run or
a new event retries it, as for a batch run).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    source TEXT NOT NULL,
    project INTEGER NOT NULL,
    task INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',  -- queued | working | done
    enqueued_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    PRIMARY KEY (source, project, task)
);
CREATE INDEX IF NOT EXISTS queue_waiting ON queue (state, not_before, enqueued_at);
CREATE TABLE IF NOT EXISTS webhooks (  -- webhooks this server added to a tool, removed at its next clean shutdown
    source TEXT NOT NULL,
    tool_url TEXT NOT NULL,  -- which instance of the tool
    project INTEGER NOT NULL,
    hook INTEGER NOT NULL,
    url TEXT NOT NULL,  -- where it sends: only a webhook that still sends there is ours to remove
    PRIMARY KEY (source, tool_url, hook)
);
"""
RATE_WINDOW_S = 60.0


@dataclass(frozen=True)
class Item:
    source: str
    project: int
    task: int
    enqueued_at: float
    attempts: int


class WorkQueue:
    def __init__(self, path: Path, max_backoff_s: float = 300.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_backoff_s = max_backoff_s
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a killed process
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._finished: deque[float] = deque()  # times tasks were done, for the rate
        with self._lock:
            self._db.execute("UPDATE queue SET state = 'queued' WHERE state = 'working'")  # a crash mid-batch

    def enqueue(self, source: str, project: int, tasks: list[int]) -> int:
        """Adds the tasks not already known (queued, being worked on or done); returns how many were new."""
        now = time.time()
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO queue (source, project, task, enqueued_at) VALUES (?, ?, ?, ?)",
                                 [(source, project, int(t), now) for t in tasks])
            self._db.execute("COMMIT")
            added = self._db.total_changes - before
            if added:
                self._wake.notify_all()
        return added

    def claim(self, limit: int, wait_s: float = 0.0, stop: threading.Event | None = None) -> list[Item]:
        """Up to `limit` due tasks of one (source, project), oldest first, marked as being worked on; waits up to
        `wait_s` for some to arrive (or until `stop` is set and `wake` called)."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                now = time.time()
                first = self._db.execute("SELECT source, project FROM queue WHERE state = 'queued' AND not_before <= ? "
                                         "ORDER BY enqueued_at, task LIMIT 1", (now,)).fetchone()
                left = deadline - time.monotonic()
                if first is not None or left <= 0 or (stop is not None and stop.is_set()):
                    break
                self._wake.wait(min(left, 0.5))
            if first is None:
                return []
            rows = self._db.execute(
                "SELECT source, project, task, enqueued_at, attempts FROM queue WHERE state = 'queued' AND "
                "not_before <= ? AND source = ? AND project = ? ORDER BY enqueued_at, task LIMIT ?",
                (now, *first, limit)).fetchall()
            self._db.executemany("UPDATE queue SET state = 'working' WHERE source = ? AND project = ? AND task = ?",
                                 [r[:3] for r in rows])
        return [Item(*r) for r in rows]

    def wake(self) -> None:
        """Wakes whoever waits in `claim` (to see a stop)."""
        with self._lock:
            self._wake.notify_all()

    def done(self, items: list[Item], errors: dict[int, str] | None = None) -> None:
        errors = errors or {}
        now = time.time()
        with self._lock:
            self._db.executemany("UPDATE queue SET state = 'done', error = ? WHERE source = ? AND project = ? AND task = ?",
                                 [(errors.get(i.task), i.source, i.project, i.task) for i in items])
            self._finished.extend([now] * len(items))

    def retry(self, items: list[Item], why: str) -> float:
        """Back to the queue, due after an exponential backoff in the attempts so far; returns the delay."""
        attempts = max((i.attempts for i in items), default=0) + 1
        delay = min(self.max_backoff_s, 2.0 ** min(attempts, 20))
        with self._lock:
            self._db.executemany("UPDATE queue SET state = 'queued', attempts = ?, not_before = ?, error = ? "
                                 "WHERE source = ? AND project = ? AND task = ?",
                                 [(attempts, time.time() + delay, why, i.source, i.project, i.task) for i in items])
        return delay

    def stats(self) -> dict:
        """Backlog (queued + being worked on), the age of the oldest waiting task, tasks done per second over the
        last minute, done, and how many wait for a retry."""
        now = time.time()
        with self._lock:
            while self._finished and self._finished[0] < now - RATE_WINDOW_S:
                self._finished.popleft()
            backlog, oldest = self._db.execute(
                "SELECT COUNT(*), MIN(enqueued_at) FROM queue WHERE state != 'done'").fetchone()
            done, retrying = self._db.execute(
                "SELECT SUM(state = 'done'), SUM(state = 'queued' AND not_before > ?) FROM queue", (now,)).fetchone()
            rate = len(self._finished) / RATE_WINDOW_S
        return {"backlog": backlog, "oldest_waiting_s": round(now - oldest, 3) if oldest else 0.0,
                "done": int(done or 0), "retrying": int(retrying or 0), "rate_per_s": round(rate, 3)}

    def states(self, source: str, project: int) -> dict[int, str]:
        with self._lock:
            rows = self._db.execute("SELECT task, state FROM queue WHERE source = ? AND project = ?", (source, project))
            return dict(rows.fetchall())

    # -- webhooks added (kept across a crash, so that the next clean shutdown removes them) -----------------------
    def note_webhook(self, source: str, tool_url: str, project: int, hook: int, url: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO webhooks VALUES (?, ?, ?, ?, ?)", (source, tool_url, project, hook, url))

    def webhooks(self, source: str, tool_url: str) -> dict[int, tuple[int, str]]:
        """hook id -> (project, url) of the webhooks added to `tool_url`."""
        with self._lock:
            rows = self._db.execute("SELECT hook, project, url FROM webhooks WHERE source = ? AND tool_url = ?",
                                    (source, tool_url))
            return {hook: (project, url) for hook, project, url in rows.fetchall()}

    def forget_webhook(self, source: str, tool_url: str, hook: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM webhooks WHERE source = ? AND tool_url = ? AND hook = ?", (source, tool_url, hook))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RateLimit:
    """At most `per_s` tasks per second on average (0: no limit): `take(n)` sleeps as needed."""

    def __init__(self, per_s: float):
        self.per_s = per_s
        self._next = time.monotonic()

    def take(self, n: int, stop: threading.Event | None = None) -> None:
        if self.per_s <= 0:
            return
        now = time.monotonic()
        wait = self._next - now
        if wait > 0:
            (stop.wait if stop is not None else time.sleep)(wait)
        self._next = max(now, self._next) + n / self.per_s
