"""Metrics go to the console, `logging.jsonl`, tensorboard and wandb; curves to `images/*.png`.

`logging.jsonl` is appended line by line and flushed, so a crash loses at most
the line being written and a resumed run continues the same file.

The run's config reaches wandb with its secrets redacted (checkpoint.redact), wandb does
not record the command line (which may hold `--hub_token`), and from here on log lines
have secret values cut out (checkpoint.install_secret_filter).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from swiftray.checkpoint import install_secret_filter, redact

logger = logging.getLogger("swiftray")


class Tracker:
    """One per run, on the driver."""

    def __init__(self, run_dir: str | Path, report_to: list[str], *, total_steps: int,
                 initial_step: int = 0, config: dict[str, Any] | None = None, desc: str = "train"):
        self.run_dir = Path(run_dir)
        install_secret_filter(config)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.jsonl = open(self.run_dir / "logging.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.tb = None
        self.wandb = None
        if "tensorboard" in report_to or "all" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir / "runs"))
        if "wandb" in report_to or "all" in report_to:
            self.wandb = _start_wandb(self.run_dir, redact(dict(config or {})))
        self.start = time.time()
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True,
                        disable=os.environ.get("SWIFTRAY_NO_PROGRESS") == "1")

    def log(self, step: int, metrics: dict[str, Any], *, prefix: str = "", echo: bool = True) -> None:
        record = {f"{prefix}{k}": _plain(v) for k, v in metrics.items()}
        for key, value in record.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.history[key].append((step, float(value)))
                if self.tb is not None:
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        line = {"step": step, **record, "elapsed_s": round(time.time() - self.start, 2)}
        self.jsonl.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.jsonl.flush()
        if echo:
            shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
            self.bar.write(f"[step {step}] {shown}")

    def advance(self, n: int = 1, postfix: dict[str, Any] | None = None) -> None:
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()})
        self.bar.update(n)

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Rows such as prompt/completion/reward go to `<name>.jsonl` (and a wandb table)."""
        with open(self.run_dir / f"{name}.jsonl", "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({k: _plain(v) for k, v in row.items()}, ensure_ascii=False) + "\n")
        if self.wandb is not None and rows:
            import wandb

            columns = list(rows[0])
            self.wandb.log({name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def close(self) -> list[Path]:
        """Flush everything and draw the curves; returns the PNGs written."""
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        return plot_history(self.history, self.run_dir / "images")


def plot_history(history: dict[str, list[tuple[int, float]]], out_dir: Path) -> list[Path]:
    """One PNG per metric with at least two points (loss, lr, eval curves, rewards)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, points in sorted(history.items()):
        if len(points) < 2:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        path = out_dir / f"{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _start_wandb(run_dir: Path, config: dict[str, Any]):
    try:
        import wandb
    except ImportError as err:
        raise RuntimeError("--report_to wandb needs the wandb package: pip install 'swiftray[wandb]'") from err
    # With no API key (or no network) run offline; `wandb sync` uploads later.
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    try:  # no run metadata: it records sys.argv, where a --hub_token would be in plain text
        settings = wandb.Settings(x_disable_meta=True)
    except Exception as err:  # an older wandb without the setting
        raise RuntimeError(f"--report_to wandb: this wandb ({getattr(wandb, '__version__', '?')}) cannot turn off "
                           f"recording the command line ({err}); upgrade wandb") from err
    return wandb.init(dir=str(run_dir), config=config, mode=mode, settings=settings,
                      project=os.environ.get("WANDB_PROJECT", "swiftray"), name=run_dir.name)


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars to plain Python numbers for JSON."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value
