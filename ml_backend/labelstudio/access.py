"""Reaching Label Studio: its address and API key from flags, the environment, or a running `prelabel up`; and
what to tell people when it refuses them. Light imports only: every command that talks to Label Studio uses this."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STACK_FILE = "label-studio.env"  # below MODEL_DIR while `prelabel up` runs: its address and token


@dataclass
class RunningStack:
    """What a running `prelabel up` left in MODEL_DIR for the next commands (and for `set -a; . FILE`)."""

    url: str
    api_key: str
    pid: int
    path: Path

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"LABEL_STUDIO_URL={self.url}\nLABEL_STUDIO_API_KEY={self.api_key}\n"
                             f"PRELABEL_UP_PID={self.pid}\n")
        self.path.chmod(0o600)

    @classmethod
    def find(cls, model_dir: Path) -> RunningStack | None:
        """The stack a live `prelabel up` process serves from `model_dir`, else None (a stale file is ignored)."""
        path = model_dir / STACK_FILE
        try:
            values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
            stack = cls(values["LABEL_STUDIO_URL"], values["LABEL_STUDIO_API_KEY"], int(values["PRELABEL_UP_PID"]), path)
        except (OSError, KeyError, ValueError):
            return None
        try:
            os.kill(stack.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
        return stack

    def remove(self) -> None:
        if RunningStack.find(self.path.parent) == self:
            self.path.unlink(missing_ok=True)


def refused_message(status: int | None, body, url: str | None) -> str | None:
    """What to do when Label Studio answers 401/403 to our API key; None for other answers."""
    if status not in (401, 403):
        return None
    detail = body.get("detail") if isinstance(body, dict) else body
    where = f" at {url}" if url else ""
    return (f"Label Studio{where} refused the API key ({status}: {detail}). Use a key of that Label Studio: "
            f"Account & Settings -> Access Token (a personal access token, or a legacy token where Label Studio runs "
            f"with LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true), passed as --api-key or LABEL_STUDIO_API_KEY; "
            f"for the Label Studio of `prelabel up`, leave both unset while it runs")
