"""Evaluation protocols on frozen backbones: feature extraction and cache, k-NN, linear probes;
the champion / challenger promotion policy (the decision; the registry acts on it).

See docs/evaluation.md. Importing this package has no side effects.
"""

from components.evaluate.features import (
    FeatureSet,
    array_fingerprint,
    cache_key,
    cached_feature_set,
    cached_features,
    extract_features,
    fashion_mnist_batches,
    fashion_mnist_tensor,
    model_fingerprint,
    pixel_features,
)
from components.evaluate.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_classify, knn_predict, top_k_neighbours
from components.evaluate.linear import (
    DEFAULT_C_GRID,
    DEFAULT_LEARNING_RATES,
    HeadSpec,
    Standardizer,
    fit_logistic_regression,
    linear_evaluation,
    linear_probe,
    logreg_probe,
    validation_split,
)
from components.evaluate.promotion import Decision, PromotionPolicy, decide

__all__ = [
    "DEFAULT_C_GRID",
    "DEFAULT_KS",
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_TEMPERATURE",
    "Decision",
    "FeatureSet",
    "HeadSpec",
    "PromotionPolicy",
    "Standardizer",
    "array_fingerprint",
    "cache_key",
    "cached_feature_set",
    "cached_features",
    "decide",
    "extract_features",
    "fashion_mnist_batches",
    "fashion_mnist_tensor",
    "fit_logistic_regression",
    "knn_classify",
    "knn_predict",
    "linear_evaluation",
    "linear_probe",
    "logreg_probe",
    "model_fingerprint",
    "pixel_features",
    "top_k_neighbours",
    "validation_split",
]
