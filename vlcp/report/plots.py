"""The fine-tuning loss curve: its geometry for the inline SVG that ``templates/report.html.j2`` draws
(numbers only, no text from the folder, so the page needs no image file and no plotting library), and
the CSV/PNG files ``vlcp distill`` writes into OUT."""
from __future__ import annotations

from dataclasses import dataclass

MAX_CURVE_POINTS = 800


@dataclass
class LossPlot:
    """Everything the SVG shows, as the strings and numbers it prints."""
    width: int
    height: int
    left: int
    top: int
    plot_width: int
    plot_height: int
    raw: str  # polyline points of the loss per step (at most MAX_CURVE_POINTS)
    avg: str  # polyline points of its moving average
    high: str  # y-axis labels
    low: str
    last_step: int
    middle: float  # x of the axis title
    window: int  # steps in the moving average


def loss_plot(losses: list[float], width: int = 720, height: int = 260) -> LossPlot:
    """The loss per step (drawn light) and its moving average (drawn dark), scaled into the frame."""
    n = len(losses)
    step = max(1, -(-n // MAX_CURVE_POINTS))
    pts = [(i, losses[i]) for i in range(0, n, step)]
    window = max(1, n // 50)
    acc, smooth = 0.0, []
    for i, v in enumerate(losses):
        acc += v - (losses[i - window] if i >= window else 0.0)
        if i % step == 0:
            smooth.append((i, acc / min(i + 1, window)))
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    left, right, top, bottom = 64, 12, 12, 36
    pw, ph = width - left - right, height - top - bottom

    def xy(i: int, v: float) -> str:
        return f"{left + pw * i / max(1, n - 1):.1f},{top + ph * (1 - (v - lo) / span):.1f}"

    return LossPlot(width=width, height=height, left=left, top=top, plot_width=pw, plot_height=ph,
                    raw=" ".join(xy(i, v) for i, v in pts), avg=" ".join(xy(i, v) for i, v in smooth),
                    high=f"{hi:.4g}", low=f"{lo:.4g}", last_step=n - 1, middle=left + pw / 2, window=window)


def write_loss_files(losses: list[float], path_png, path_csv) -> str:
    """The fine-tuning curve as files: finetune_loss.csv always (the report draws it as SVG), finetune_loss.png
    too when matplotlib is installed; returns the name of the picture, or of the CSV without matplotlib."""
    path_csv.write_text("step,loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(losses)))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return path_csv.name
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(losses)), losses, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("denoising loss (Eq. 1)")
    ax.set_title("vlcp finetune")
    fig.tight_layout()
    fig.savefig(path_png, dpi=100)
    plt.close(fig)
    return path_png.name
