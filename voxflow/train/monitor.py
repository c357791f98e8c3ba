"""Training monitoring: a log file, ``metrics.jsonl`` (one JSON line per epoch) and ``progress.png``.

Only rank 0 monitors. ``metrics.jsonl`` is rewritten up to the resumed epoch on ``--resume`` so it
holds exactly one line per finished epoch. ``progress.png`` (matplotlib, Agg backend) shows the train
and validation loss, the pseudo-Dice per class with its EMA, and the learning rate.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["RunMonitor"]

log = logging.getLogger(__name__)


class RunMonitor:
    """Per-run log file, metrics and plot in ``run_dir`` (a no-op when ``enabled`` is false)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, class_names: Sequence[str] = ()):
        self.run_dir = run_dir
        self.enabled = enabled
        self.class_names = list(class_names)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        self._handler: logging.Handler | None = None
        self._old_level = logging.NOTSET

    def __enter__(self) -> RunMonitor:
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._handler = logging.FileHandler(self.run_dir / "training_log.txt")
            self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self._handler.setLevel(logging.INFO)
            root = logging.getLogger("voxflow")
            self._old_level = root.level
            if root.getEffectiveLevel() > logging.INFO:  # the log file always gets INFO
                root.setLevel(logging.INFO)
            root.addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handler is not None:
            root = logging.getLogger("voxflow")
            root.removeHandler(self._handler)
            root.setLevel(self._old_level)
            self._handler.close()
            self._handler = None

    def restore(self, start_epoch: int) -> None:
        """Keep the metrics of epochs < ``start_epoch`` (after a resume), drop later ones."""
        if not self.enabled or not self.metrics_path.exists():
            return
        lines = [json.loads(s) for s in self.metrics_path.read_text().splitlines() if s.strip()]
        self.history = [m for m in lines if m["epoch"] < start_epoch]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in self.history))
        os.replace(tmp, self.metrics_path)

    def record(self, metrics: dict[str, Any]) -> None:
        """Append one epoch's metrics and redraw the plot."""
        if not self.enabled:
            return
        self.history.append(metrics)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        try:
            self.plot()
        except Exception as e:  # a plotting failure must never stop training
            log.warning("could not draw progress.png: %s", e)

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.history
        epochs = [m["epoch"] for m in h]
        fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
        axes[0].plot(epochs, [m["train_loss"] for m in h], label="train loss")
        axes[0].plot(epochs, [m["val_loss"] for m in h], label="val loss")
        axes[0].legend()
        axes[0].set_ylabel("loss")
        for i, name in enumerate(self.class_names):
            axes[1].plot(epochs, [m["pseudo_dice"][i] for m in h], linestyle=":", label=f"pseudo-Dice {name}")
        axes[1].plot(epochs, [m["ema_pseudo_dice"] for m in h], label="EMA mean pseudo-Dice")
        axes[1].set_ylabel("Dice")
        axes[1].legend()
        axes[2].plot(epochs, [m["lr"] for m in h])
        axes[2].set_ylabel("learning rate")
        axes[2].set_xlabel("epoch")
        fig.tight_layout()
        tmp = self.run_dir / ".progress.tmp.png"
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        os.replace(tmp, self.run_dir / "progress.png")
