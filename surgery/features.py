"""Moved to :mod:`surgery.train.feature_cache`; this name stays importable."""

from surgery.train.feature_cache import (  # noqa: F401
    cache_bytes,
    compute_features,
    feature_cache_reason,
    head_path,
    pre_logits,
    runtime_reason,
)
