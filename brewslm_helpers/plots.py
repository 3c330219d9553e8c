"""Small plotting conveniences (matplotlib) so every lesson's figures look alike."""
from __future__ import annotations

import matplotlib.pyplot as plt


def new_axes(title: str, xlabel: str, ylabel: str, figsize=(6, 3.5)):
    """A fresh figure with one titled, labelled, gridded axes; returns ``(fig, ax)``."""
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (same length as ``values``), for noisy loss curves."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
