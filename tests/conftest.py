"""Pinned thread counts for the whole suite: small tests, 2-core CI, reproducible sums.

MinkowskiEngine's OpenMP runtime reads OMP_NUM_THREADS when it is loaded, so it is set here,
before any test module imports torch or MinkowskiEngine.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
