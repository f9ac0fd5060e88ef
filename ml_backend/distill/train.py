"""The student's training loop: AdamW with warm-up and cosine decay, validation mAP each epoch, a checkpoint each
epoch (`checkpoints/last.pt`: weights, optimizer, schedule, history, random state), the best weights kept as
`model.pt`, early stop after `patience` epochs without improvement, an optional time limit, and resume.

Threads: training sets torch's intra-op threads (`training_threads`) and restores them afterwards. OpenMP's
spin-waiting (torch's default) makes an epoch many times slower when another process is busy on the CPU; the CLI
therefore starts torch with `OMP_WAIT_POLICY=PASSIVE` (`ml_backend.distill.wait_passively`)."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..evaluation import coco_evaluate
from ..models.student import WEIGHTS_FILE, StudentConfig, StudentRaw, build_student, postprocess
from ..types import make_detections
from .dataset import DistillError, TensorSet, collate

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoints/last.pt"


@dataclass
class TrainOptions:
    epochs: int = 40
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    patience: int = 10  # epochs without a better validation mAP before stopping
    seed: int = 0
    time_limit_s: float | None = None  # stop (keeping the best weights) when the next epoch would pass it
    eval_threshold: float = 0.05
    threads: int | None = None  # torch intra-op threads on CPU; None: `training_threads`' default


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_map: float
    stopped: str  # "completed" | "early stop" | "time limit" | "interrupted"
    seconds: float
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    threads: int = 0


def training_threads(requested: int | None = None) -> int:
    """`requested`, else one per physical core the process may run on (hyper-threads share a core's arithmetic
    units), never more than torch's default."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or usable
    return requested or max(1, min(physical, usable, torch.get_num_threads()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validate(model: torch.nn.Module, data: TensorSet, classes: list[str], threshold: float) -> dict:
    """mAP of the model's post-processed outputs on `data` (in input pixels: IoU does not change with scale)."""
    device = next(model.parameters()).device
    raw = StudentRaw(model, data.size).eval()
    preds, truths = [], []
    with torch.inference_mode():
        for start in range(0, len(data), 32):
            boxes, scores = raw(torch.stack(data.images[start : start + 32]).to(device))
            for b, s in zip(boxes.cpu().numpy(), scores.cpu().numpy()):
                xyxy, conf, k, _ = postprocess(b, s, threshold)
                preds.append(make_detections(xyxy, conf, k, [classes[i] for i in k]))
    for t in data.targets:
        k = t["labels"].numpy()
        truths.append(make_detections(t["boxes"].numpy(), np.ones(len(k)), k, [classes[i] for i in k]))
    result = coco_evaluate(truths, preds, classes, [(data.size, data.size)] * len(data))
    return {"map": result.map, "map50": result.map50}


def _schedule(optimizer, warmup: int, total: Callable[[], int]):
    """Linear warm-up, then cosine decay to 1 % over `total()` steps (read at each step: a time limit shortens it)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total() - warmup)))) * 0.99 + 0.01

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    out: Path,
    config: StudentConfig,
    train_set: TensorSet,
    val_set: TensorSet,
    options: TrainOptions,
    device: torch.device,
    resume: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    show_progress: bool = True,
    backbone_weights=None,
) -> TrainResult:
    """Trains with `training_threads(options.threads)` torch threads, restoring the caller's count afterwards."""
    threads, previous = training_threads(options.threads), torch.get_num_threads()
    torch.set_num_threads(threads)
    log.info("training with %d torch threads (OMP_WAIT_POLICY=%s)", threads, os.environ.get("OMP_WAIT_POLICY", "unset"))
    try:
        result = _train(out, config, train_set, val_set, options, device, resume, on_epoch, show_progress,
                        backbone_weights)
    finally:
        torch.set_num_threads(previous)
    result.threads = threads
    return result


def _train(out, config, train_set, val_set, options, device, resume, on_epoch, show_progress,
           backbone_weights) -> TrainResult:
    if len(train_set) == 0 or len(val_set) == 0:
        raise DistillError(f"training needs images in both halves of the split (train {len(train_set)}, "
                           f"val {len(val_set)}); annotate more tasks")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(options.seed)
    model = build_student(config, backbone_weights).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    drop_last = len(train_set) > options.batch_size  # no tiny last batch (BatchNorm needs company)
    steps_per_epoch = len(train_set) // options.batch_size if drop_last else 1
    plan = {"epochs": options.epochs}  # with a time limit: the epochs that fit, estimated after the first
    warmup = min(options.warmup_steps, options.epochs * steps_per_epoch // 5 + 1)
    scheduler = _schedule(optimizer, warmup, lambda: plan["epochs"] * steps_per_epoch)
    history: list[dict] = []
    first_epoch, best_map, best_epoch, resumed_from = 0, -1.0, 0, None
    checkpoint = out / CHECKPOINT
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        # where training started (ImageNet or scratch) no longer matters once there are trained weights
        config.pretrained_backbone = state["config"].get("pretrained_backbone", config.pretrained_backbone)
        if state["config"] != asdict(config):
            raise DistillError(f"{checkpoint} was trained with another configuration ({state['config']}); "
                               f"use another --out, or --restart to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_map, best_epoch = state["history"], state["best_map"], state["best_epoch"]
        plan["epochs"] = state.get("planned_epochs", options.epochs)
        first_epoch = resumed_from = state["epoch"] + 1
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        log.info("resuming from epoch %d of %s (best mAP %.3f at epoch %d)", first_epoch, checkpoint, best_map, best_epoch)
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(train_set, batch_size=options.batch_size, shuffle=True, collate_fn=collate,
                                         generator=generator, drop_last=drop_last)
    stopped = "completed"
    if first_epoch and history and first_epoch - best_epoch >= options.patience:  # it had stopped early
        stopped = "early stop"
    epoch = first_epoch
    progress = _progress(show_progress)
    try:
        with progress:
            bar = progress.add_task("training", total=plan["epochs"] * steps_per_epoch,
                                    completed=first_epoch * steps_per_epoch, info="")
            for epoch in range(first_epoch, options.epochs):
                if stopped != "completed":
                    break
                if epoch >= plan["epochs"]:
                    stopped = "time limit"
                    break
                epoch_start = time.perf_counter()
                generator.manual_seed(options.seed * 100_003 + epoch)  # the same order whether resumed or not
                model.train()
                losses = []
                for images, targets in loader:
                    images = [im.to(device).float().div_(255) for im in images]
                    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                    loss = sum(model(images, targets).values())
                    if not torch.isfinite(loss):
                        raise DistillError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                    optimizer.step()
                    scheduler.step()
                    losses.append(loss.item())
                    progress.update(bar, advance=1, info=f"epoch {epoch + 1}/{plan['epochs']}  loss {np.mean(losses):.3f}"
                                    f"  val mAP {best_map if best_map >= 0 else 0:.3f} (best)")
                metrics = validate(model, val_set, config.classes, options.eval_threshold)
                entry = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4), "val_map": metrics["map"],
                         "val_map50": metrics["map50"], "seconds": round(time.perf_counter() - epoch_start, 1)}
                history.append(entry)
                if metrics["map"] > best_map:
                    best_map, best_epoch = metrics["map"], epoch + 1
                    _save_atomically(model.state_dict(), out / WEIGHTS_FILE)
                    config.save(out)
                if options.time_limit_s is not None and epoch == first_epoch and not resumed_from:
                    # the learning rate decays over the epochs that fit in the limit, not over --epochs
                    left = options.time_limit_s - (time.perf_counter() - started)
                    plan["epochs"] = max(1, min(options.epochs, epoch + 1 + int(left // entry["seconds"])))
                    progress.update(bar, total=plan["epochs"] * steps_per_epoch)
                    log.info("time limit: %d epochs fit, the learning rate decays over them", plan["epochs"])
                _save_checkpoint(checkpoint, model, optimizer, scheduler, epoch, history, best_map, best_epoch, config,
                                 plan["epochs"])
                progress.update(bar, info=f"epoch {epoch + 1}/{plan['epochs']}  loss {entry['loss']:.3f}  "
                                f"val mAP {metrics['map']:.3f} / mAP50 {metrics['map50']:.3f}")
                log.info("epoch %d: loss %.3f, val mAP %.3f, mAP50 %.3f (%.0f s)", epoch + 1, entry["loss"],
                         metrics["map"], metrics["map50"], entry["seconds"])
                if on_epoch:
                    on_epoch(entry | {"epochs": plan["epochs"], "best_map": best_map, "best_epoch": best_epoch})
                if epoch + 1 - best_epoch >= options.patience:
                    stopped = "early stop"
                elif options.time_limit_s is not None:
                    elapsed = time.perf_counter() - started
                    if elapsed + entry["seconds"] > options.time_limit_s and epoch + 1 < options.epochs:
                        stopped = "time limit"
    except KeyboardInterrupt:
        stopped = "interrupted"
    epochs_run = len(history)
    return TrainResult(epochs_run, best_epoch, best_map, stopped, time.perf_counter() - started, history, resumed_from)


def _save_checkpoint(path: Path, model, optimizer, scheduler, epoch, history, best_map, best_epoch, config,
                     planned_epochs: int) -> None:
    """Written to a temporary file and renamed (as the best weights are), so a crash mid-write leaves the previous
    file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "history": history, "best_map": best_map, "best_epoch": best_epoch,
        "config": asdict(config), "planned_epochs": planned_epochs,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    _save_atomically(state, path)


def _save_atomically(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _progress(show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not show)
