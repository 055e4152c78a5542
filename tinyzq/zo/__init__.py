"""Zeroth-order training: trainable sets (params), the seeded SPSA estimator (spsa), ZO-SGD (optim)."""
