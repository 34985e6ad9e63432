"""PNG pictures of training runs (loss and validation score per epoch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_training(history: list[dict[str, Any]], path: Path) -> None:
    """Loss (left axis) and validation score (right axis) per epoch, written as PNG."""
    if not history:
        return
    # Deferred: pyplot must come after the Agg backend is chosen, and costs ~0.5 s to import.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(epochs, [h["loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (15 x masked MSE + 200 x MSE)", color="tab:blue")
    scored = [(h["epoch"], h["val_score"]) for h in history if h.get("val_score") is not None]
    if scored:
        ax2 = ax.twinx()
        ax2.plot(*zip(*scored, strict=True), "s-", color="tab:red", label="validation score")
        ax2.set_ylabel("validation score (0.85 song nDCG + 0.15 tag nDCG)", color="tab:red")
    ax.set_title("songrec autoencoder training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
