"""PNG plots of a run, redrawn from its log after dev evaluations (matplotlib, Agg).

    plots/loss.png        best training loss per generation, coloured by layer
    plots/dev.png         the dev metric after each round (the zero adapter at round -1)
    plots/throughput.png  candidates scored per second, per generation

`Plotter` is one of the outputs the driver hands every record to (driver.py): a dev record
redraws the plots, at most every `interval_s` seconds (drawing takes about a second), and the
final record always does. A plot that fails to draw costs a warning, never the run. The driver
makes one only when asked to (`run(..., plots=True)`, the default).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

from orchestrator.state import RunLog

INTERVAL_S = 30.0


class Plotter:
    """Draws `log` into `folder` after dev and final records (a reporter with the whole log)."""

    def __init__(self, folder: str | Path, log: RunLog, interval_s: float = INTERVAL_S) -> None:
        self.folder, self.log, self.interval_s = Path(folder), log, interval_s
        self.drawn: float | None = None  # monotonic time of the last drawing

    def __call__(self, record: dict) -> None:
        event = record.get("event")
        if event in ("dev", "final"):
            self.draw(final=event == "final")

    def draw(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and self.drawn is not None and now - self.drawn < self.interval_s:
            return
        self.drawn = now
        try:
            _draw(self.folder, self.log)
        except Exception as err:  # noqa: BLE001 - plots are a convenience, the run goes on
            warnings.warn(f"plots not drawn: {err}", stacklevel=2)


def _draw(folder: Path, log: RunLog) -> None:
    os.environ.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / "dfolora-mpl"))
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    gens = [r for r in log.metrics if r.get("best_loss") is not None]
    x = [r["generation"] for r in gens]

    fig, ax = plt.subplots(figsize=(7, 4))
    points = ax.scatter(x, [r["best_loss"] for r in gens], c=[r["layer"] for r in gens],
                        cmap="viridis", s=12)
    ax.plot(x, [r["loss_star"] for r in gens], color="black", lw=1, label="loss* (committed)")
    if gens:
        fig.colorbar(points, ax=ax, label="layer")
    ax.set(xlabel="generation", ylabel="training loss", title="best loss per generation")
    ax.legend(loc="upper right")
    _save(fig, folder / "loss.png", plt)

    fig, ax = plt.subplots(figsize=(7, 4))
    metric = (log.dev[0].get("metric") if log.dev else None) or "accuracy"
    rounds = [-1] + [r["round"] for r in log.dev]
    values = []
    if log.zero_shot:
        values.append(log.zero_shot["dev"][metric])
    else:
        rounds = rounds[1:]
    values += [r["dev"][metric] for r in log.dev]
    ax.plot(rounds, values, marker="o")
    ax.set(xlabel="round (-1: zero adapter)", ylabel=f"dev {metric}", title="dev metric")
    _save(fig, folder / "dev.png", plt)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["generation"] for r in log.metrics],
            [r.get("candidates_per_s", float("nan")) for r in log.metrics])
    ax.set(xlabel="generation", ylabel="candidates / s", title="throughput (all actors)")
    _save(fig, folder / "throughput.png", plt)


def _save(fig, path: Path, plt) -> None:
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
