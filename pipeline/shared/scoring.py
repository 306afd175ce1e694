"""Image scores of anomaly maps, as the config's ``score`` section pools them: used by the experiments
(each fold's evaluation) and by ``train`` (a bundle's thresholds on its validation part).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pipeline.config import ScoreConfig


def image_scores(
    maps: dict[str, np.ndarray],
    boxes: np.ndarray,
    score: ScoreConfig,
    margin: float,
    region: Literal["image", "box"] | None = None,
) -> dict[str, np.ndarray]:
    """Image scores of every map; ``region=box`` pools over the box and its ``margin`` (the masked pixels)."""
    from reconstruction.deviation import image_score

    return {
        name: image_score(
            m,
            boxes,
            pooling=score.pooling,
            region=region or score.region,
            topk_fraction=score.topk_fraction,
            margin=margin,
            inset=score.inset,
        )
        for name, m in maps.items()
    }
