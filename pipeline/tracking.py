"""What a training stage records while it trains: log.jsonl (one JSON line per logged step, read back by the
stage, the report and the loss plots) and the tracker the pack names (`tracking: tensorboard` by default, with
event files published in the stage's own folder; W&B and MLflow when installed and asked for, offline).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from core.errors import PackError


def tracking(pack, run_dir: Path) -> str:
    """transformers' report_to for the pack's `tracking`, after checking its package is installed.

    Nothing leaves the machine unless the user says so: W&B runs offline (WANDB_MODE=offline, files under
    runs/<domain>/wandb; `wandb sync` uploads them) unless WANDB_MODE is set, and MLflow writes to
    runs/<domain>/mlruns unless MLFLOW_TRACKING_URI is set. TensorBoard's event files go to each stage's
    own folder (see `train`)."""
    choice = pack.tracking
    if choice == "none":
        return "none"
    if importlib.util.find_spec(choice) is None:  # each choice is also its package's name
        raise PackError(f"tracking={choice} needs the {choice} package, which is not installed: "
                        f".venv/bin/pip install {choice} (or run with tracking=tensorboard or tracking=none)")
    if choice == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_PROJECT", pack.name)
    elif choice == "mlflow":
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri())
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", pack.name)
    return choice


def point_tensorboard(trainer, ctx) -> None:
    """TensorBoard's events in ctx.out/tensorboard, published with the stage (transformers' default is under
    output_dir, our checkpoints folder, which is deleted once the stage is saved)."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(ctx.out / "tensorboard")


def log_callback(path: Path, extra_keys=()):
    """A TrainerCallback writing one JSON line per log event: step, loss, learning rate, eval loss,
    and whatever the trainer reports (reward margins and accuracies for the preference stages)."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:  # the final loss and rewards are always logged
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:  # every rank logs; one line per event
                return
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
            if "learning_rate" in row:
                row["lr"] = row["learning_rate"]
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=float) + "\n")

    return JsonlLog()
