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
from pyro import poutine
from pyro_scvi.datasets import synthetic_zinb

import pyro_scvi
from pyro_scvi import SCVI, ZINB, ScviGuide, ScviModel, from_anndata
from pyro_scvi.model.priors import LogNormalLibrary, ObservedLibrary
from pyro_scvi.posterior.arviz import to_inference_data
from pyro_scvi.posterior.fitted import Fitted, FittedModel

PACKAGE = Path(pyro_scvi.__file__).parent
ANALYSES = [
    "analysis/de.py",
    "posterior/arviz.py",
    "analysis/ppc.py",
    "posterior/queries.py",
    "posterior/gap.py",
    "posterior/mcmc.py",
    "analysis/metrics.py",
]


@pytest.mark.parametrize("name", ANALYSES)
def test_analyses_use_only_the_public_attributes_of_a_model(name):
    # that they do not import the facade at all is tests/test_layers.py's rule
    tree = ast.parse((PACKAGE / name).read_text())
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


# ------------------------------------------------------------------ the library object

DATA = Path(__file__).parent / "data"
FIT = dict(max_epochs=2, batch_size=32, progress_bar=False, engine="eager", seed=0)


def _fit(adata, **kwargs):
    return SCVI(adata, batch_key="batch", n_latent=2, n_hidden=8, **kwargs).train(**FIT)


def _elbos(model):
    return model.history[["train_elbo", "validation_elbo"]].to_numpy(dtype=float)


def test_observed_library_object_is_what_the_flag_stands_for(small_adata):
    by_flag = _fit(small_adata, use_observed_lib_size=True)
    by_object = _fit(small_adata, library_prior=ObservedLibrary())
    assert isinstance(by_flag.model.library_prior, ObservedLibrary)
    assert by_flag.settings == by_object.settings
    assert by_object.settings["use_observed_lib_size"] is True
    np.testing.assert_array_equal(_elbos(by_flag), _elbos(by_object))
    np.testing.assert_array_equal(
        by_flag.get_latent_representation(), by_object.get_latent_representation()
    )
    assert by_object.guide.l_encoder is None  # the guide asked the object: no q(l)
    x, b = by_object.data.tensors(np.arange(5))
    trace = poutine.trace(by_object.model).get_trace(x, b)
    assert "l" not in trace.nodes
    # the default is still the paper's latent library
    latent = SCVI(small_adata, n_latent=2, n_hidden=8)
    assert isinstance(latent.model.library_prior, LogNormalLibrary)
    assert latent.settings["use_observed_lib_size"] is False


def test_a_model_of_the_old_flag_code_loads_and_is_refitted_exactly():
    """tests/data/model_observed_library was saved before ObservedLibrary existed."""
    adata = synthetic_zinb(n_cells=60, n_genes=12, n_batches=2, seed=3)
    old = SCVI.load(DATA / "model_observed_library", adata, device="cpu")
    assert isinstance(old.model.library_prior, ObservedLibrary)
    assert old.guide.l_encoder is None and old.settings["use_observed_lib_size"] is True
    expected_latent = np.load(DATA / "model_observed_library_latent.npy")
    np.testing.assert_allclose(
        old.get_latent_representation(), expected_latent, rtol=1e-5, atol=1e-6
    )
    # the same recipe through the object gives the old code's numbers: no numerical change
    # (the old code left the gate head's bias at its layer's random start; now 0.05)
    # (and the old default warm-up: 400 epochs)
    new = SCVI(
        adata,
        batch_key="batch",
        n_latent=2,
        n_hidden=8,
        library_prior=ObservedLibrary(),
        likelihood=ZINB(initial_dropout=None),
    ).train(**FIT, kl_warmup_epochs=400)
    np.testing.assert_allclose(_elbos(new), _elbos(old), rtol=1e-5)
    np.testing.assert_allclose(
        new.get_latent_representation(), expected_latent, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("observed", [False, True], ids=["latent", "observed"])
def test_both_library_modes_survive_save_and_load(small_adata, tmp_path, observed):
    model = _fit(small_adata, use_observed_lib_size=observed)
    model.save(tmp_path / "m")
    again = SCVI.load(tmp_path / "m", small_adata, device="cpu")
    assert type(again.model.library_prior) is type(model.model.library_prior)
    assert again.settings["use_observed_lib_size"] is observed
    assert (again.guide.l_encoder is None) is observed
    np.testing.assert_array_equal(
        again.get_latent_representation(), model.get_latent_representation()
    )


class WideLibrary(LogNormalLibrary):
    """A user's library prior: the data's per-batch prior, three times as wide."""

    def __init__(self, loc, scale):
        super().__init__(loc, 3 * torch.as_tensor(scale))


class HalfLibrary(ObservedLibrary):
    """A user's observed library: half of each cell's total count."""

    def observed(self, x):
        return super().observed(x) - np.log(2.0)


def test_user_library_objects_are_used_and_saved(small_adata, tmp_path):
    plain = SCVI(small_adata, batch_key="batch", n_latent=2, n_hidden=8)
    wide = SCVI(small_adata, batch_key="batch", n_latent=2, n_hidden=8, library_prior=WideLibrary)
    assert isinstance(wide.model.library_prior, WideLibrary)
    b = torch.tensor([0, 1])
    torch.testing.assert_close(
        wide.model.library_prior(b).scale, 3 * plain.model.library_prior(b).scale
    )
    with pytest.warns(UserWarning, match="trust=True"):  # a class of the user's module
        wide.save(tmp_path / "wide")
    with pytest.warns(UserWarning, match="full unpickling"):
        loaded = SCVI.load(tmp_path / "wide", small_adata, trust=True)
    assert isinstance(loaded.model.library_prior, WideLibrary)

    half = SCVI(small_adata, n_latent=2, n_hidden=8, library_prior=HalfLibrary())
    assert half.settings["use_observed_lib_size"] is True and half.guide.l_encoder is None
    x, b = half.data.tensors(np.arange(4))
    trace = poutine.trace(half.model).get_trace(x, b)
    rho, fn = trace.nodes["rho"]["value"], trace.nodes["x"]["fn"]
    nb_mean = fn.mean / (1 - torch.sigmoid(fn.gate_logits))
    torch.testing.assert_close(nb_mean, x.sum(-1, keepdim=True) / 2 * rho, rtol=1e-4, atol=1e-4)


def test_a_contradicting_alias_is_refused(small_adata):
    with pytest.raises(pyro_scvi.InputError, match="contradicts.*ObservedLibrary"):
        SCVI(small_adata, use_observed_lib_size=True, library_prior=WideLibrary)
    with pytest.raises(pyro_scvi.InputError, match="use_observed_lib_size=False contradicts"):
        SCVI(small_adata, use_observed_lib_size=False, library_prior=ObservedLibrary())
    with pytest.raises(ValueError, match="ObservedLibrary"):
        ScviModel(10, 1, None)


# ------------------------------------------------------------------ one builder


def _built_alike(a, b):
    """``a`` and ``b`` were built alike: the same settings, module trees, parameters (and
    which of them train), history and split, and they answer queries the same."""
    assert a.settings == b.settings
    assert repr(a.model) == repr(b.model) and repr(a.guide) == repr(b.guide)
    for module_a, module_b in ((a.model, b.model), (a.guide, b.guide)):
        state_a, state_b = module_a.state_dict(), module_b.state_dict()
        assert list(state_a) == list(state_b)
        assert [k for k in state_a if not torch.equal(state_a[k], state_b[k])] == []
        trained = [n for n, _ in module_a.named_parameters()]
        assert trained == [n for n, _ in module_b.named_parameters()]
    assert a.history["train_elbo"].tolist() == b.history["train_elbo"].tolist()
    np.testing.assert_array_equal(a.validation_indices, b.validation_indices)
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    assert a.get_elbo(n_samples=3, seed=0) == b.get_elbo(n_samples=3, seed=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(use_observed_lib_size=True),
        dict(prior=pyro_scvi.VampPrior(4)),
        dict(scheme=pyro_scvi.BayesianDecoder()),
        dict(library_residual=False, dispersion="gene-batch"),
        dict(guide=pyro_scvi.PerCellGuide.from_data),
    ],
    ids=["observed", "vamp", "bayesian-decoder", "paper-guide", "per-cell"],
)
def test_init_and_every_loader_build_alike(small_adata, tmp_path, kwargs):
    """A model set up by SCVI(...) equals itself loaded by SCVI.load and by
    SCVI.load_checkpoint, module for module and answer for answer: a loader that built a
    part otherwise (a guide without the library residual, a prior not wired to the guide's
    encoder, a scheme left out) fails here."""
    model = SCVI(small_adata, batch_key="batch", n_latent=2, n_hidden=8, **kwargs)
    train_size = 1.0 if "guide" in kwargs else 0.9
    fit = dict(progress_bar=False, engine="eager", train_size=train_size)
    # A VampPrior's pseudo-inputs cannot be pickled while a run is under way (a weakref on
    # the parameter), so its model cannot be checkpointed: a known fault, not this test's.
    ckpt = None if "prior" in kwargs else tmp_path / "ckpt"
    model.train(1, checkpoint_dir=ckpt, checkpoint_every=1, **fit)
    model.save(tmp_path / "m")
    _built_alike(SCVI.load(tmp_path / "m", small_adata, device="cpu"), model)
    if ckpt is not None:
        # the checkpoint holds the epoch's end, before the run's last batch-norm refresh:
        # it is compared as a model folder, and then by training on as the model does
        resumed = SCVI.load_checkpoint(ckpt, small_adata, device="cpu")
        _built_alike(resumed, SCVI.load(ckpt, small_adata, device="cpu"))
        _built_alike(resumed.train(1, **fit), model.train(1, **fit))


def test_a_query_model_builds_alike_from_a_reference_or_its_folder(small_adata, tmp_path):
    is_query = (small_adata.obs["batch"] == "batch1").to_numpy()
    reference = _fit(small_adata[~is_query].copy())
    reference.save(tmp_path / "ref")
    query = small_adata[is_query].copy()
    from_object = SCVI.load_query_data(query, reference)
    from_folder = SCVI.load_query_data(query, tmp_path / "ref")
    _built_alike(from_folder, from_object)
    assert from_folder.reference_batches == from_object.reference_batches == ("batch0",)
    assert not from_object.is_trained and from_object.training_run is None
    # saved, a query model is rebuilt by the builder as an ordinary model of all batches
    from_object.save(tmp_path / "q")
    ordinary = SCVI.load(tmp_path / "q", query, device="cpu")
    assert ordinary.settings == from_object.settings and ordinary.reference_batches is None
    assert ordinary.batch_categories == from_object.batch_categories
    np.testing.assert_allclose(
        ordinary.get_latent_representation(), from_object.get_latent_representation(), atol=1e-6
    )
