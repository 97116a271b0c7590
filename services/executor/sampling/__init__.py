"""Tensor-level pieces of the sampler: logit penalties and top-k / top-p / min-p masks.

Each function works on a whole batch at once (one row per sequence) and takes the
per-row parameters as Python sequences, so the caller decides cheaply, on the host,
which work a step needs.
"""
