"""Test images, a loopback image host, the backend server as a subprocess, and RSS readings from /proc."""

from __future__ import annotations

import base64
import functools
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

RSS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_HELP = ("a smoke run: tiny random models (ml_backend.models.tiny), tiny sizes and counts, seconds; the same code "
              "path, measurements and JSON (under results/smoke/), but its targets are not judged: exit 0 when it ran")


def result_path(name: str, smoke: bool = False) -> Path:
    """Where a benchmark writes its JSON by default: results/NAME, or results/smoke/NAME for a --smoke run (a smoke
    run never overwrites a measurement)."""
    return RESULTS / "smoke" / name if smoke else RESULTS / name


def exit_status(passed: bool, smoke: bool) -> int:
    """Exit status: 1 when a target is missed; a smoke run on tiny models judges no target (it fails by raising)."""
    return 0 if smoke or passed else 1


def make_image(path: Path, seed: int, size: tuple[int, int] = (1200, 800)) -> Path:
    """A JPEG of coloured shapes on a gradient (distinct content per seed, so no embedding-cache hits)."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(60, 200, 3) + np.linspace(0, 1, h)[:, None, None] * 40
    image = Image.fromarray(ramp.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.uniform(0, w - 100), rng.uniform(0, h - 100)
        box = (x, y, x + rng.uniform(60, 400), y + rng.uniform(60, 300))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    return path


def blocks_data_uri(width: int, height: int, seed: int) -> str:
    """A small PNG of a few coloured blocks as a data URI (requests that need no image fetching)."""
    rng = np.random.default_rng(seed)
    array = np.full((height, width, 3), 40, np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, width // 2), rng.integers(0, height // 2)
        array[y : y + height // 3, x : x + width // 3] = rng.integers(60, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ImageHost:
    """Serves a directory over HTTP on 127.0.0.1 (loopback only), in a thread."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass


def _rss_fields(status: str) -> dict[str, int]:
    """The RSS lines of a /proc/<pid>/status text, in bytes."""
    fields = (line.partition(":") for line in status.splitlines())
    return {key: int(rest.split()[0]) * 1024 for key, _, rest in fields if key in RSS_FIELDS}


def proc_rss(pid: int) -> dict[str, int]:
    return _rss_fields(Path(f"/proc/{pid}/status").read_text())


def import_rss(modules: str) -> dict[str, int]:
    """RSS of a fresh Python process right after `import {modules}` (e.g. "torch, transformers")."""
    code = f"import {modules}; print(open('/proc/self/status').read())"
    return _rss_fields(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


class BackendProcess:
    """`prelabel serve` in its own process, so that its memory is its own."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, start_timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "ml_backend.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(command, env=os.environ | env, stdout=self.log, stderr=subprocess.STDOUT)
        self.start_timeout = start_timeout

    def wait_ready(self, client: httpx.Client) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if client.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"backend did not answer /health within {self.start_timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
