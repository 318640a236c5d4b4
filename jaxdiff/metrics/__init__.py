"""Sample-quality metrics: the FID Inception network (:mod:`~jaxdiff.metrics.inception`)."""

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
    "InceptionFeatures",
    "expected_state_dict_shapes",
    "inception_from_state_dict",
    "load_inception",
    "preprocess",
    "resize_bilinear",
]
