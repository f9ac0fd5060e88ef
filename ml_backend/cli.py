"""`prelabel` command line: thin calls into the library."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Optional

import typer

from .errors import PrelabelError

app = typer.Typer(help="Open-vocabulary pre-annotation for Label Studio and CVAT.", no_args_is_help=True)
dev = typer.Typer(help="Developer tools.", no_args_is_help=True)
app.add_typer(dev, name="dev")

log = logging.getLogger("prelabel")


def _logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _settings(**overrides):
    from .settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 to accept other machines)."),
    port: int = typer.Option(9090, help="Port (Label Studio's ML backend default is 9090)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts file (prompts/*.yaml)."),
    detector: Optional[str] = typer.Option(None, help="Detector: hub id or local directory."),
    segmenter: Optional[str] = typer.Option(None, help="Segmenter: hub id, local directory, sam_vit_*.pth, or 'none'."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Run the Label Studio ML backend (models load once, at start)."""
    import uvicorn

    from .labelstudio.server import create_app
    from .pipeline import Pipeline

    _logging(verbose)
    settings = _settings(
        prompts=prompts, detector=detector, device=device,
        segmenter=None if segmenter is None else ("" if segmenter.lower() == "none" else segmenter),
    )
    if not _is_loopback(host) and not settings.basic_auth_user:
        log.warning("serving on %s without BASIC_AUTH_USER/BASIC_AUTH_PASS: anyone who can reach it can use it", host)
    try:
        pipeline = Pipeline.from_settings(settings)
    except PrelabelError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    log.info("models ready: %s", pipeline.base_version)
    uvicorn.run(create_app(pipeline), host=host, port=port, log_level="debug" if verbose else "info")


@dev.command("tiny-models")
def tiny_models(out_dir: Path = typer.Argument(..., help="Writes OUT_DIR/detector and OUT_DIR/segmenter.")):
    """Write tiny randomly initialised models (offline) for tests and CI."""
    from .models.tiny import write_tiny_models

    for kind, path in write_tiny_models(out_dir).items():
        typer.echo(f"{kind}: {path}")


if __name__ == "__main__":
    app()
