"""Sample-quality metrics: FID, KID and precision/recall on network features.

The offline digits feature network is :mod:`jaxdiff.metrics.digits`; reference statistics of a
dataset are made by ``python -m jaxdiff.metrics.stats``.
"""

from jaxdiff.metrics import fid
from jaxdiff.metrics.fid import (
    FeatureStats,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    load_stats,
    precision_recall,
    save_stats,
)

__all__ = [
    "FeatureStats",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "frechet_distance_from_stats",
    "kernel_inception_distance",
    "load_stats",
    "precision_recall",
    "save_stats",
]
