"""The durable work queue of following (ml_backend/follow.py): nothing acknowledged is lost across a kill -9, nothing
is done twice, backoff, stats, the rate cap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from ml_backend.follow import RateLimit, WorkQueue


def test_an_id_enqueued_twice_is_one_task_and_a_done_task_stays_done(tmp_path):
    queue = WorkQueue(tmp_path / "q.sqlite3")
    assert queue.enqueue("ls", 1, [5, 6, 6]) == 2
    assert queue.enqueue("ls", 1, [6, 7]) == 1
    assert queue.enqueue("ls", 2, [5]) == 1  # another project's task 5
    items = queue.claim(10)
    assert [(i.project, i.task) for i in items] == [(1, 5), (1, 6), (1, 7)]  # one project per batch, oldest first
    queue.done(items, {6: "image 404"})
    assert queue.enqueue("ls", 1, [5, 6, 7]) == 0
    assert queue.states("ls", 1) == {5: "done", 6: "done", 7: "done"}
    assert [(i.project, i.task) for i in queue.claim(10)] == [(2, 5)]
    assert queue.claim(10) == []


def test_webhooks_added_are_kept_per_tool_instance_across_a_reopen(tmp_path):
    queue = WorkQueue(tmp_path / "q.sqlite3")
    queue.note_webhook("ls", "http://ls-a:8080", 3, 11, "http://me/webhook")
    queue.note_webhook("ls", "http://ls-b:8080", 3, 11, "http://me/webhook")  # the same id on another Label Studio
    queue.close()
    queue = WorkQueue(tmp_path / "q.sqlite3")
    assert queue.webhooks("ls", "http://ls-a:8080") == {11: (3, "http://me/webhook")}
    queue.forget_webhook("ls", "http://ls-a:8080", 11)
    assert queue.webhooks("ls", "http://ls-a:8080") == {} and 11 in queue.webhooks("ls", "http://ls-b:8080")
    queue.close()


def test_backoff_waits_longer_each_time(tmp_path):
    queue = WorkQueue(tmp_path / "q.sqlite3")
    queue.enqueue("ls", 1, [1])
    first = queue.retry(queue.claim(1), "ConnectError")
    assert first == 2.0 and queue.claim(1) == [] and queue.stats()["retrying"] == 1
    queue._db.execute("UPDATE queue SET not_before = 0")  # time passes
    (item,) = queue.claim(1)
    assert item.attempts == 1 and queue.retry([item], "ConnectError") == 4.0


def test_stats_give_backlog_age_and_rate(tmp_path):
    queue = WorkQueue(tmp_path / "q.sqlite3")
    queue.enqueue("ls", 1, list(range(10)))
    time.sleep(0.05)
    stats = queue.stats()
    assert stats["backlog"] == 10 and stats["oldest_waiting_s"] >= 0.05 and stats["rate_per_s"] == 0
    queue.done(queue.claim(4))
    stats = queue.stats()
    assert stats["backlog"] == 6 and stats["done"] == 4 and stats["rate_per_s"] == round(4 / 60, 3)


def test_claim_waits_for_work_to_arrive(tmp_path):
    import threading

    queue = WorkQueue(tmp_path / "q.sqlite3")
    threading.Timer(0.2, lambda: queue.enqueue("ls", 1, [9])).start()
    start = time.monotonic()
    assert [i.task for i in queue.claim(5, wait_s=5)] == [9]
    assert time.monotonic() - start < 2


def test_a_kill_9_loses_nothing_acknowledged_and_work_in_hand_goes_back_to_the_queue(tmp_path):
    """A process enqueues (each call returns after its commit: the acknowledgement), claims a batch, and is killed
    with SIGKILL while working on it; the next process finds every task, the claimed ones queued again."""
    path = tmp_path / "q.sqlite3"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from ml_backend.follow import WorkQueue
        queue = WorkQueue(__import__("pathlib").Path({str(path)!r}))
        for start in range(0, 1000, 100):
            queue.enqueue("ls", 3, list(range(start, start + 100)))
        print("acknowledged", flush=True)
        claimed = queue.claim(32)
        queue.done(claimed[:16])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert run.returncode == -signal.SIGKILL and "acknowledged" in run.stdout, run.stderr
    queue = WorkQueue(path)
    states = queue.states("ls", 3)
    assert len(states) == 1000
    assert sum(s == "done" for s in states.values()) == 16 and sum(s == "queued" for s in states.values()) == 984
    assert [i.task for i in queue.claim(16)] == list(range(16, 32))  # the interrupted batch comes first


def test_the_rate_cap_spaces_batches():
    limit = RateLimit(per_s=40)
    start = time.monotonic()
    for _ in range(5):
        limit.take(4)  # 20 tasks at 40/s: the 5th batch may start after 4 x 0.1 s
    assert 0.35 <= time.monotonic() - start < 1.0
    free = RateLimit(0)
    start = time.monotonic()
    free.take(10**6)
    assert time.monotonic() - start < 0.01


def test_annotate_follow_refuses_a_limit_or_ray_in_one_line():
    from typer.testing import CliRunner

    from ml_backend.cli import app

    for extra in (["--limit", "5"], ["--engine", "ray"]):
        result = CliRunner().invoke(app, ["annotate", "--project", "1", "--follow", "--url", "http://127.0.0.1:9",
                                          "--api-key", "x", *extra])
        assert result.exit_code == 2 and "--follow runs locally on every new task" in result.output, result.output
