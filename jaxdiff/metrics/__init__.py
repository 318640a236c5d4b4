"""Sample-quality metrics: FID, KID and precision/recall on network features.

The FID Inception network (pytorch-fid's, from its weights converted to safetensors) is
:mod:`jaxdiff.metrics.inception`; the offline digits feature network is
:mod:`jaxdiff.metrics.digits`; reference statistics of a dataset are made by
``python -m jaxdiff.metrics.stats``. :func:`compute_fid` is FID end to end: two uint8 image sets
and the Inception weights file in, a number out (``jaxdiff.metrics.fid`` is the module of the
feature-level functions).
"""

from jaxdiff.metrics import fid
from jaxdiff.metrics.fid import (
    FeatureStats,
    compute_fid,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    load_stats,
    precision_recall,
    save_stats,
)
from jaxdiff.metrics.inception import (
    FIDInceptionV3,
    InceptionFeatures,
    expected_state_dict_shapes,
    inception_from_state_dict,
    load_inception,
    preprocess,
    resize_bilinear,
)

__all__ = [
    "FIDInceptionV3",
    "FeatureStats",
    "compute_fid",
    "InceptionFeatures",
    "expected_state_dict_shapes",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "frechet_distance_from_stats",
    "inception_from_state_dict",
    "kernel_inception_distance",
    "load_inception",
    "load_stats",
    "precision_recall",
    "preprocess",
    "resize_bilinear",
    "save_stats",
]
