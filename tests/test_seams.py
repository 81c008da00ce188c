"""The package's seams: analyses depend on a small contract, not on the SCVI facade;
saving says when a model could not be loaded elsewhere."""

import ast
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_scvi
from pyro_scvi import SCVI, ScviGuide, ScviModel, from_anndata
from pyro_scvi.convert import to_inference_data
from pyro_scvi.fitted import Fitted, FittedModel
from pyro_scvi.priors import LogNormalLibrary

PACKAGE = Path(pyro_scvi.__file__).parent
ANALYSES = ["de.py", "convert.py", "ppc.py", "posterior.py", "gap.py", "mcmc.py", "metrics.py"]


@pytest.mark.parametrize("name", ANALYSES)
def test_analyses_do_not_reach_into_the_facade(name):
    tree = ast.parse((PACKAGE / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert ".scvi" not in imported and "pyro_scvi.scvi" not in imported
    private = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "model"
        and node.attr.startswith("_")
    }
    assert not private, f"{name} calls the model's private {sorted(private)}"


def test_scvi_is_a_fitted(small_adata):
    assert isinstance(SCVI(small_adata, n_latent=2, n_hidden=8), Fitted)


def test_analyses_run_on_a_model_and_guide_without_the_facade(small_adata):
    data = from_anndata(small_adata, batch_key="batch")
    loc, scale = (torch.from_numpy(v) for v in data.library_log_stats())
    model = ScviModel(data.n_genes, data.n_batch, LogNormalLibrary(loc, scale), n_latent=2)
    guide = ScviGuide(data.n_genes, data.n_batch, n_latent=2)
    fitted = FittedModel(model, guide, data, adata=small_adata, batch_key="batch")
    assert isinstance(fitted, Fitted)
    idata = to_inference_data(fitted, n_samples=3, seed=0)
    assert dict(idata.posterior["z"].sizes) == {"chain": 1, "draw": 3, "cells": 300, "latent": 2}
    other = fitted.data_for(small_adata[:10].copy())
    assert other.n_cells == 10 and other.batch_categories == data.batch_categories


def test_saving_a_prior_from_main_warns_and_the_model_loads_nowhere_else(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, warnings
            import pyro.distributions as dist, torch
            import pyro_scvi

            class MyPrior(pyro_scvi.Prior):
                def forward(self):
                    return dist.Laplace(torch.zeros(self.n_latent), 1.0).to_event(1)

            adata = pyro_scvi.datasets.synthetic_zinb(n_cells=60, n_genes=10, seed=0)
            model = pyro_scvi.SCVI(adata, prior=MyPrior(), n_latent=2, n_hidden=8)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.save(sys.argv[1])
            print("WARNED:", " | ".join(str(w.message) for w in caught))
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "m")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "__main__.MyPrior is defined in __main__" in proc.stdout
    load = (
        "import sys, pyro_scvi; adata = pyro_scvi.datasets.synthetic_zinb(n_cells=60, "
        "n_genes=10, seed=0); pyro_scvi.SCVI.load(sys.argv[1], adata)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", load, str(tmp_path / "m")], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "MyPrior" in proc.stderr  # what the warning foretold


def test_saving_importable_components_does_not_warn(small_adata, tmp_path):
    model = SCVI(small_adata, prior=pyro_scvi.MixtureOfGaussians(3), n_latent=2, n_hidden=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.pt").exists()
    assert np.isfinite(SCVI.load(tmp_path / "m", small_adata).get_latent_representation()).all()
