"""A loopback server answering the REST calls cvat-sdk 2.80 makes, shaped as CVAT's serializers shape them (CVAT
itself needs Docker): for `prelabel cvat track` and `prelabel cvat follow` tests."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from datetime import datetime, timezone
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from .conftest import free_port

TOKEN, USER, PASSWORD = "cvat-pat-0123456789", "annotator", "s3cret-pass"
W, H = 160, 120


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


class CvatLikeServer:
    """Answers the REST calls cvat-sdk 2.80 makes for `prelabel cvat track`, shaped as CVAT's serializers shape
    them (AboutSerializer, TaskReadSerializer, LabelSerializer pages, DataMetaReadSerializer, LabeledDataSerializer):
    login by user and password (session and CSRF cookies) or a personal access token (Bearer), tasks with frames
    numbered 0..size-1 after start_frame and step, deleted frames, a frame that does not decode; the task list
    (TaskReadSerializer pages, `project_id` filter), image chunks (zip) and stored annotations. Records every
    request and each annotations body written; `stop()` and `start()` take it off and back on its port."""

    def __init__(self, chunk_size: int = 36):
        self.tasks: dict[int, dict] = {}
        self.chunk_size = chunk_size
        self.seen: list[tuple[str, str]] = []
        self.written: list[tuple[str, str, dict]] = []  # (method, query, body)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, data: bytes, kind="application/json", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _json(self, status: int, body, headers=()):
                self._send(status, json.dumps(body).encode(), headers=headers)

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization")
                cookies = SimpleCookie(self.headers.get("Cookie", ""))
                if auth is not None:
                    if auth == f"Bearer {TOKEN}":
                        return True
                    self._json(401, {"detail": "Invalid token."})
                    return False
                if "sessionid" in cookies and cookies["sessionid"].value == "session-1":
                    if self.command in ("GET", "HEAD") or self.headers.get("X-CSRFToken") == "csrf-1":
                        return True
                    self._json(403, {"detail": "CSRF Failed: CSRF token missing."})
                    return False
                self._json(401, {"detail": "Authentication credentials were not provided."})
                return False

            def _task(self, parts) -> dict | None:
                task = server.tasks.get(int(parts[2])) if parts[2].isdigit() else None
                if task is None:
                    self._json(404, {"detail": "No Task matches the given query."})
                return task

            def do_GET(self):
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                server.seen.append(("GET", self.path))
                parts = url.path.strip("/").split("/")
                if url.path.rstrip("/") == "/api/server/about":
                    return self._json(200, {"name": "Computer Vision Annotation Tool", "description": "CVAT",
                                            "version": "2.80.0", "logo_url": "/logo.svg", "subtitle": ""})
                if not self._authorized():
                    return
                if url.path.rstrip("/") == "/api/labels":
                    task = server.tasks.get(int(query.get("task_id", -1)))
                    if task is None:
                        return self._json(404, {"detail": "No Task matches the given query."})
                    results = [server.label_json(task, lb) for lb in task["labels"]]
                    return self._json(200, {"count": len(results), "next": None, "previous": None, "results": results})
                if url.path.rstrip("/") == "/api/tasks":
                    tasks = [t for t in server.tasks.values()
                             if "project_id" not in query or str(t["project_id"]) == query["project_id"]]
                    page, size = int(query.get("page", 1)), int(query.get("page_size", 10))
                    results = [server.task_json(t) for t in tasks[(page - 1) * size: page * size]]
                    more = f"{server.url}/api/tasks?page={page + 1}" if page * size < len(tasks) else None
                    return self._json(200, {"count": len(tasks), "next": more, "previous": None, "results": results})
                if parts[:2] == ["api", "tasks"] and parts[3:] == ["annotations"]:
                    if (task := self._task(parts)) is not None:
                        self._json(200, {"version": task["version"], **task["annotations"]})
                    return
                if parts[:2] == ["api", "tasks"] and len(parts) == 3:
                    if (task := self._task(parts)) is not None:
                        self._json(200, server.task_json(task))
                elif parts[:2] == ["api", "tasks"] and parts[3:] == ["data", "meta"]:
                    if (task := self._task(parts)) is not None:
                        self._json(200, server.meta_json(task))
                elif parts[:2] == ["api", "tasks"] and parts[3:] == ["data"]:
                    if (task := self._task(parts)) is None:
                        return
                    number = int(query["number"])
                    if query.get("type") == "chunk":
                        return self._send(200, server.chunk(task, number), "application/zip")
                    if query.get("type") != "frame" or not 0 <= number < len(task["frames"]):
                        return self._json(400, [f"Invalid frame '{number}'. The frame number should be in the "
                                                f"[0, {len(task['frames'])}] range"])
                    self._send(200, task["frames"][number], "image/png")
                else:
                    self._json(404, {"detail": "Not found."})

            def _body(self) -> dict:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def do_POST(self):
                server.seen.append(("POST", self.path))
                body = self._body()
                if urlsplit(self.path).path.rstrip("/") == "/api/auth/login":
                    if (body.get("username"), body.get("password")) != (USER, PASSWORD):
                        return self._json(400, {"non_field_errors": ["Unable to log in with provided credentials."]})
                    return self._json(200, {"key": "legacy-key"}, headers=[
                        ("Set-Cookie", "csrftoken=csrf-1; Path=/"), ("Set-Cookie", "sessionid=session-1; Path=/")])
                self._json(404, {"detail": "Not found."})

            def _write(self):
                url = urlsplit(self.path)
                server.seen.append((self.command, self.path))
                parts = url.path.strip("/").split("/")
                if not self._authorized() or parts[:2] != ["api", "tasks"] or parts[3:] != ["annotations"]:
                    return None if self.headers.get("Authorization") is None else self._json(404, {"detail": "Not found."})
                if (task := self._task(parts)) is None:
                    return
                body = self._body()
                server.written.append((self.command, url.query, body))
                ids = iter(range(1, 10**6))  # CVAT answers with what it stored, ids given
                tracks = [t | {"id": next(ids), "shapes": [s | {"id": next(ids)} for s in t["shapes"]]}
                          for t in body.get("tracks", [])]
                task["version"] += 1
                if self.command == "PUT":
                    task["annotations"] = {"tags": [], "shapes": [], "tracks": []}
                stored = task["annotations"]
                stored["tracks"] += tracks
                stored["shapes"] += [s | {"id": next(ids)} for s in body.get("shapes", [])]
                stored["tags"] += [t | {"id": next(ids)} for t in body.get("tags", [])]
                self._json(200, {"version": task["version"], "tags": [], "shapes": [], "tracks": tracks})

            do_PATCH = do_PUT = _write

        self.handler, self.port = Handler, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        """Off its port: connections are refused until `start()`."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_task(self, task_id: int, labels: list[tuple[int, str, str]], frames: list[bytes], mode="interpolation",
                 start_frame=0, step=1, deleted=(), project_id=None):
        self.tasks[task_id] = dict(id=task_id, labels=labels, frames=frames, mode=mode, start_frame=start_frame,
                                   step=step, deleted=list(deleted), version=0, project_id=project_id,
                                   annotations={"tags": [], "shapes": [], "tracks": []})

    def chunk(self, task, number: int) -> bytes:
        """Original-quality chunk `number` of an image task: its frames' files in a zip, in frame order."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            first = number * self.chunk_size
            for n, data in enumerate(task["frames"][first: first + self.chunk_size], first):
                archive.writestr(f"img_{n:03d}.png", data)
        return buffer.getvalue()

    def label_json(self, task, lb):
        id, name, type = lb
        return {"id": id, "name": name, "color": "#ff0000", "attributes": [], "type": type, "svg": "",
                "sublabels": [], "has_parent": False, "task_id": task["id"], "project_id": None, "parent_id": None}

    def task_json(self, task):
        date = datetime(2026, 1, 2, tzinfo=timezone.utc).isoformat()
        size = len(task["frames"])
        return {"url": f"{self.url}/api/tasks/{task['id']}", "id": task["id"], "name": f"task {task['id']}",
                "project_id": task["project_id"], "mode": task["mode"] if size else "", "owner": {"url": f"{self.url}/api/users/1", "id": 1,
                "username": USER, "first_name": "", "last_name": ""}, "assignee": None, "bug_tracker": "",
                "created_date": date, "updated_date": date, "overlap": 0, "segment_size": size,
                "status": "annotation", "data_chunk_size": self.chunk_size if size else None, "data_compressed_chunk_type": "imageset",
                "guide_id": None, "data_original_chunk_type": "video" if task["mode"] == "interpolation" else "imageset",
                "size": size, "image_quality": 70, "data": task["id"] if size else None, "dimension": "2d", "subset": "",
                "organization": None, "target_storage": None, "source_storage": None,
                "jobs": {"count": 1, "completed": 0, "validation": 0, "url": f"{self.url}/api/jobs?task_id={task['id']}"},
                "labels": {"url": f"{self.url}/api/labels?task_id={task['id']}"},
                "assignee_updated_date": None, "validation_mode": None}

    def meta_json(self, task):
        size, step = len(task["frames"]), task["step"]
        media = ([{"width": W, "height": H, "name": "street.mp4", "related_files": 0, "has_related_context": False}]
                 if task["mode"] == "interpolation" else
                 [{"width": W, "height": H, "name": f"img_{n:03d}.png", "related_files": 0, "has_related_context": False}
                  for n in range(size)])
        return {"chunks_updated_date": datetime(2026, 1, 2, tzinfo=timezone.utc).isoformat(), "chunk_size": self.chunk_size,
                "size": size, "image_quality": 70, "start_frame": task["start_frame"],
                "stop_frame": task["start_frame"] + (size - 1) * step, "frame_filter": f"step={step}" if step > 1 else "",
                "frames": media, "deleted_frames": task["deleted"], "included_frames": None, "chapters": None,
                "storage": "local", "cloud_storage_id": None}

    def frames_read(self, task_id: int) -> list[tuple[int, str]]:
        out = []
        for method, path in self.seen:
            url = urlsplit(path)
            if url.path.rstrip("/") == f"/api/tasks/{task_id}/data":
                query = parse_qs(url.query)
                out.append((int(query["number"][0]), query["quality"][0]))
        return out

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
