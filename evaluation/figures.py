"""Report figures with matplotlib's Agg backend: overlays, ROC curves, score distributions, ``compare``'s
maps and segmentations of every method.

Only bundled DejaVu fonts are used and nothing is downloaded. Each ``*_figure`` returns PNG
bytes so the report can both write the file and embed it.

>>> png = score_distribution_figure({"msgmsd": ([0.1, 0.2, 0.9], [0, 0, 1])})
>>> png[:4] == b"\\x89PNG"
True
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import roc_curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _import_pyplot() -> Any:
    """pyplot on the Agg backend, its config and font cache kept out of HOME.

    Unless the caller set ``MPLCONFIGDIR`` or imported matplotlib already (then theirs holds), the
    import runs with a private temporary ``MPLCONFIGDIR`` that the process removes at exit; the
    variable is restored afterwards so child processes do not inherit a folder that will vanish.
    """
    private = not os.environ.get("MPLCONFIGDIR") and "matplotlib" not in sys.modules
    if private:
        path = tempfile.mkdtemp(prefix="loris-mpl-")
        atexit.register(shutil.rmtree, path, True)
        os.environ["MPLCONFIGDIR"] = path
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless; must precede pyplot
        import matplotlib.pyplot as pyplot  # builds the font cache, in the folder chosen above

        return pyplot
    finally:
        if private:
            os.environ.pop("MPLCONFIGDIR", None)


plt: Any = _import_pyplot()

DPI = 90


@dataclass
class Example:
    """One case for the overlay grid; arrays are ``[H, W]``, images in [0, 1]."""

    id: int
    label: int
    case: str  # "best" / "median" / "worst"
    image: np.ndarray
    reconstruction: np.ndarray
    anomaly_map: np.ndarray
    gt_mask: np.ndarray
    pred_mask: np.ndarray
    dice: float = float("nan")
    score: float = float("nan")
    method: str = ""


def select_cases(
    ids: Sequence[int], labels: Sequence[int], dice: Sequence[float], scores: Sequence[float]
) -> list[tuple[int, int, str]]:
    """``(id, label, case)`` for the best, median and worst image of each class.

    Distended images are ranked by per-image Dice (high is good), normal ones by image score
    (low is good, since any response there is a false alarm).

    >>> select_cases([1, 2, 3, 4], [0, 0, 1, 1], [np.nan, np.nan, 0.2, 0.8], [0.1, 0.5, 0.6, 0.7])
    [(1, 0, 'best'), (1, 0, 'median'), (2, 0, 'worst'), (4, 1, 'best'), (4, 1, 'median'), (3, 1, 'worst')]
    """
    ids_a, labels_a = np.asarray(ids), np.asarray(labels)
    dice_a = np.asarray(dice, dtype=np.float64)
    scores_a = np.asarray(scores, dtype=np.float64)
    out: list[tuple[int, int, str]] = []
    for label, key in ((0, -scores_a), (1, np.nan_to_num(dice_a, nan=-1.0))):
        idx = np.flatnonzero(labels_a == label)
        if idx.size == 0:
            continue
        order = idx[np.argsort(-key[idx], kind="stable")]  # best first
        for case, pos in (("best", 0), ("median", (order.size - 1) // 2), ("worst", order.size - 1)):
            out.append((int(ids_a[order[pos]]), label, case))
    return out


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _contour(ax: Axes, mask: np.ndarray, color: str, width: float = 1.0) -> None:
    # contour() warns on constant input, so draw only masks with an edge
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=color, linewidths=width)


def overlay_figure(examples: Sequence[Example]) -> bytes:
    """Grid, one row per example: scan | reconstruction | anomaly map | GT contour | predicted contour."""
    cols = ("scan", "reconstruction", "anomaly map", "ground truth", "prediction")
    rows = max(len(examples), 1)
    fig, axes = plt.subplots(rows, 5, figsize=(10, 2.1 * rows), squeeze=False)
    for r, ex in enumerate(examples):
        kind = "distended" if ex.label == 1 else "normal"
        axes[r, 0].set_ylabel(f"{kind} {ex.case}\nid {ex.id}\nDice {ex.dice:.2f} score {ex.score:.3g}", fontsize=7)
        axes[r, 0].imshow(ex.image, cmap="gray", vmin=0, vmax=1)
        axes[r, 1].imshow(ex.reconstruction, cmap="gray", vmin=0, vmax=1)
        axes[r, 2].imshow(ex.anomaly_map, cmap="jet")
        axes[r, 3].imshow(ex.image, cmap="gray", vmin=0, vmax=1)
        _contour(axes[r, 3], np.asarray(ex.gt_mask, bool), "lime")
        axes[r, 4].imshow(ex.image, cmap="gray", vmin=0, vmax=1)
        _contour(axes[r, 4], np.asarray(ex.gt_mask, bool), "lime")
        _contour(axes[r, 4], np.asarray(ex.pred_mask, bool), "red")
    for r in range(rows):
        for c in range(5):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(cols[c], fontsize=8)
    if not examples:
        axes[0, 2].text(0.5, 0.5, "no examples", ha="center", va="center", transform=axes[0, 2].transAxes)
    fig.suptitle("green: ground truth, red: prediction (dice_val threshold, closing-opening 3x3)", fontsize=8)
    return _png(fig)


def roc_figure(curves: Mapping[str, Mapping[int, tuple[Sequence[float], Sequence[int]]]]) -> bytes:
    """Image-level ROC curves: one panel per metric, one line per fold.

    ``curves[method][fold] = (scores, labels)``; folds with a single class are skipped.
    """
    methods = list(curves) or ["(none)"]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), squeeze=False)
    for ax, m in zip(axes[0], methods):
        for fold, (scores, labels) in sorted(curves.get(m, {}).items()):
            labels_a = np.asarray(labels)
            if np.unique(labels_a).size < 2:
                continue
            fpr, tpr, _ = roc_curve(labels_a, np.asarray(scores, dtype=np.float64))
            ax.plot(fpr, tpr, lw=1, label=f"fold {fold} (AUC {np.trapezoid(tpr, fpr):.2f})")
        ax.plot([0, 1], [0, 1], ls=":", c="gray", lw=0.8)
        ax.set(title=m, xlabel="false positive rate", xlim=(0, 1), ylim=(0, 1))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel("true positive rate")
    fig.tight_layout()
    return _png(fig)


def score_distribution_figure(scores: Mapping[str, tuple[Sequence[float], Sequence[int]]]) -> bytes:
    """Histogram of image scores per class, one panel per metric (all folds pooled)."""
    methods = list(scores) or ["(none)"]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 2.8), squeeze=False)
    for ax, m in zip(axes[0], methods):
        if m in scores:
            s = np.asarray(scores[m][0], dtype=np.float64)
            y = np.asarray(scores[m][1])
            ok = np.isfinite(s)
            bins = np.histogram_bin_edges(s[ok], bins=20) if ok.any() else 10
            for label, name, color in ((0, "normal", "tab:blue"), (1, "distended", "tab:red")):
                sel = ok & (y == label)
                if sel.any():
                    ax.hist(s[sel], bins=bins, alpha=0.55, color=color, label=f"{name} (n={int(sel.sum())})")
        ax.set(title=m, xlabel="image score")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("images")
    fig.tight_layout()
    return _png(fig)


Panel = tuple[str, dict[int, tuple[np.ndarray, np.ndarray]]]  # (column title, {scan id: (map, segmentation)})


def comparison_figure(scans: Sequence[Example], panels: Sequence[Panel]) -> bytes:
    """Per scan two rows (maps, segmentations), one column per method after the scan itself; PNG bytes."""
    fig, axes = plt.subplots(2 * len(scans), 1 + len(panels), figsize=(1.6 * (1 + len(panels)), 3.3 * len(scans)))
    axes = np.asarray(axes).reshape(2 * len(scans), 1 + len(panels))
    for r, ex in enumerate(scans):
        top, bottom = axes[2 * r], axes[2 * r + 1]
        top[0].imshow(ex.image, cmap="gray", vmin=0, vmax=1)
        top[0].set_ylabel(f"id {ex.id}\n{ex.case.split(' ')[0]}", fontsize=7)
        bottom[0].imshow(ex.image, cmap="gray", vmin=0, vmax=1)
        _contour(bottom[0], np.asarray(ex.gt_mask, bool), "lime", 0.8)
        for c, (title, maps) in enumerate(panels, start=1):
            amap, seg = maps.get(int(ex.id), (np.zeros_like(ex.image), np.zeros(ex.image.shape, bool)))
            top[c].imshow(amap, cmap="jet")
            bottom[c].imshow(ex.image, cmap="gray", vmin=0, vmax=1)
            _contour(bottom[c], np.asarray(ex.gt_mask, bool), "lime", 0.8)
            _contour(bottom[c], np.asarray(seg, bool), "red", 0.8)
            if r == 0:
                top[c].set_title(textwrap.fill(title, 18), fontsize=7)
    axes[0, 0].set_title("scan", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("maps (top) and segmentations (bottom; green: ground truth, red: val threshold)", fontsize=8)
    return _png(fig)
