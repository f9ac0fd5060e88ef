"""Distillation as a background job of a server (Label Studio's START_TRAINING): a training command given by the
server (`prelabel distill`) in a child process, one at a time, its state readable for /metrics while it runs and
after it ends. In the core, so that an adapter's server can start it without importing another adapter; the run
reports through `STATE_FILE`."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import threading
import time
from pathlib import Path

from .errors import PrelabelError

log = logging.getLogger(__name__)
STATE_FILE = "state.json"  # what a distill run is doing now, written by `ml_backend.distill.run.write_state`


class JobBusyError(PrelabelError):
    kind = "training_busy"
    status = 409


class DistillJob:
    """Starts `COMMAND --project ID --out ROOT/project-ID-<time> ARGS...` (the server's command, e.g. `prelabel
    distill`) with the Label Studio address and key in its environment (never on its command line); `status()`
    merges the job's own state with the run's `state.json` (phase, epoch, loss, validation mAP)."""

    def __init__(self, root: Path, command: list[str], extra_args: str = ""):
        self.root = Path(root)
        self.command = list(command)
        self.extra_args = shlex.split(extra_args)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._info: dict = {"state": "idle", "runs": 0}

    def start(self, project: int, url: str, api_key: str) -> dict:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                raise JobBusyError(f"a distillation is already running (project {self._info['project']}, since "
                                   f"{time.strftime('%H:%M:%S', time.localtime(self._info['started']))}); one at a time")
            out = self.root / f"project-{project}-{time.strftime('%Y%m%d-%H%M%S')}"
            out.mkdir(parents=True, exist_ok=True)
            cmd = [*self.command, "--project", str(project), "--out", str(out), *self.extra_args]
            env = os.environ | {"LABEL_STUDIO_URL": url, "LABEL_STUDIO_API_KEY": api_key}
            log_file = open(out / "distill.log", "wb")  # noqa: SIM115 - the child writes it; closed when it ends
            self._proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL)
            self._info = {"state": "running", "project": project, "out": str(out), "pid": self._proc.pid,
                          "started": time.time(), "finished": None, "returncode": None, "runs": self._info["runs"] + 1}
            log.info("distillation of project %s started (pid %s), output in %s", project, self._proc.pid, out)
            threading.Thread(target=self._wait, args=(self._proc, log_file), name="distill-job", daemon=True).start()
            return dict(self._info)

    def _wait(self, proc: subprocess.Popen, log_file) -> None:
        code = proc.wait()
        log_file.close()
        with self._lock:
            if proc is not self._proc:
                return
            self._info |= {"state": "done" if code == 0 else "failed", "finished": time.time(), "returncode": code}
            if code != 0:
                self._info["error"] = _last_line(Path(self._info["out"]) / "distill.log")
        log.log(logging.INFO if code == 0 else logging.WARNING, "distillation of project %s ended with status %s",
                self._info.get("project"), code)

    def status(self) -> dict:
        with self._lock:
            info = dict(self._info)
        if info.get("out"):
            try:
                info["progress"] = json.loads((Path(info["out"]) / STATE_FILE).read_text())
            except (OSError, ValueError):
                info["progress"] = {}
        return info

    def stop(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][-500:] if lines else ""
