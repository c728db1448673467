"""Seeded sample caps: the one rule every task kind and the unlabeled text use to take a subset."""

from __future__ import annotations

import numpy as np


def seeded_subset(n: int, cap: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded random subset of size ``cap``, or None to keep all ``n``."""
    if cap is None or cap >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
