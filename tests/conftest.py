"""Pinned thread counts for the whole suite: small tests, 2-core CI, reproducible sums.

MinkowskiEngine's OpenMP runtime reads OMP_NUM_THREADS when it is loaded, so it is set here,
before any test module imports torch or MinkowskiEngine.

The suite is a package: tests/unit/ (functions, layers, readers, config, stores), tests/stages/
(each stage end to end on tiny data), tests/faults/ (kill and resume, bad input, I/O faults);
the code they share lives in tests/fixtures/ and is imported as ``tests.fixtures.<module>``.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
