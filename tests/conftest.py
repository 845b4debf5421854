"""Shared test settings: a bounded hypothesis profile so the default suite stays fast."""

import os

import torch
from hypothesis import HealthCheck, settings

import fmm  # noqa: F401  (before any test computes: it turns on MKL's reproducibility)

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# At most two threads, unless OMP_NUM_THREADS says otherwise (torch has read it already): a
# run beside other work asks for one, and two threads each on busy cores run ~10x slower.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
