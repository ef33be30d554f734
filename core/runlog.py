"""A training stage's log.jsonl (one JSON object per logged step) and its loss curves.

Training writes the log (pipeline/training.py's callback, plus our held-out measurements before and after);
the stage draws its own loss.png and the report draws every stage's curves side by side, both with
`plot_logs`. matplotlib is imported only when drawing.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=float) + "\n")


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r and "step" in r]


def plot_logs(logs: dict[str, list[dict]], png: Path) -> Path | None:
    """One panel per log ({title: rows}): train loss, the trainer's eval loss, and our held-out loss before and
    after training (token-weighted, the stage.json numbers; the trainer's eval_loss averages batch means, so
    the two differ a little). None when there is nothing to draw."""
    logs = {title: rows for title, rows in logs.items() if rows}
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(max(6.0, 4.5 * len(logs)), 4), squeeze=False, dpi=100)
    for ax, (title, rows) in zip(axes[0], logs.items()):
        for key, style, label in (("loss", "-", "train loss"), ("eval_loss", "o--", "eval loss (trainer)"),
                                  ("heldout_loss", "s", "held-out loss before / after")):
            points = _series(rows, key)
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
