"""Shared test setup: seeded, validated Pyro with a clean parameter store; small data."""

import os
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro_scvi.datasets import synthetic_zinb

# The test networks are tiny: intra-op threads gain nothing, and on a busy 2-core machine
# OpenMP threads contending with other processes made steps up to 10x slower.
torch.set_num_threads(1)

# The real datasets sit beside the repository in the developers' and CI's work area; the
# notebooks' and benchmarks' smoke runs (subprocesses) use them when they are there, and
# simulated stand-ins when not. An explicit PYRO_SCVI_DATA wins.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("PYRO_SCVI_DATA", str(SHARED_DATA))


@pytest.fixture(autouse=True)
def pyro_setup():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def small_adata():
    """300 cells x 40 genes, 3 clusters, 2 batches, CSR integer counts."""
    return synthetic_zinb(n_cells=300, n_genes=40, n_clusters=3, n_batches=2, seed=0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
