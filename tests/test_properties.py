"""Property-based tests of input validation (hypothesis).

Whatever AnnData a user brings (any dtype, shape, sparse format, NaN/inf/negative/
non-integer values anywhere, a counts layer or not, batch columns of any kind), setting up
and fitting a model ends in one of two ways: a clean ``InputError`` naming the fix, or a
fit with finite results. Never another exception, and the AnnData is never modified.
"""

import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyro_scvi import SCVI, Engine, InputError

#: Examples per property: enough to cover every dtype x format x corruption a few times,
#: few enough for the suite's time budget (each example fits a tiny model for one epoch).
MAX_EXAMPLES = 300

DTYPES = [
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint32,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    object,
]
# (AnnData itself refuses COO, so it cannot reach the package)
FORMATS = ["dense", "csr", "csc", "csr_array", "csc_array"]
CORRUPTIONS = [None] * 6 + [
    "nan",
    "inf",
    "-inf",
    "negative",
    "fraction",
    "huge",
    "huger",
    "overflow",
]
BATCHES = [None, None, "int", "str", "categorical", "with_nan", "single_cell_batch", "missing_key"]


@st.composite
def user_anndata(draw):
    # mostly usable shapes, sometimes degenerate ones
    n_cells = draw(st.sampled_from([6, 9, 14, 4, 3, 2, 1, 0]))
    n_genes = draw(st.sampled_from([3, 5, 2, 1, 0]))
    counts = draw(arrays(np.int64, (n_cells, n_genes), elements=st.integers(0, 40)))
    if draw(st.booleans()) and counts.size:  # often sparse, as real counts are
        counts = counts * draw(arrays(np.int64, counts.shape, elements=st.integers(0, 1)))
    no_empty_cells = draw(st.sampled_from([True, True, True, False]))
    if no_empty_cells and counts.size:  # mostly (cells without counts are refused)
        counts[np.arange(n_cells), np.arange(n_cells) % n_genes] += 1
    dtype = draw(st.sampled_from(DTYPES))
    corruption = draw(st.sampled_from(CORRUPTIONS))
    X = counts.astype(dtype)
    if corruption is not None and X.size:
        X = X.astype(np.float64) if dtype is not object else X
        i = draw(st.integers(0, n_cells - 1))
        j = draw(st.integers(0, n_genes - 1))
        X[i, j] = {
            "nan": np.nan,
            "inf": np.inf,
            "-inf": -np.inf,
            "negative": -draw(st.integers(1, 5)),
            "fraction": X[i, j] + 0.5,
            "huge": 1e6,
            "huger": 2.0**32,  # the largest count accepted
            "overflow": 1e39,  # finite in float64, infinite in float32
        }[corruption]
    fmt = draw(st.sampled_from(FORMATS))
    if fmt != "dense" and X.dtype not in (object, np.float16):  # scipy has neither
        X = {
            "csr": sp.csr_matrix,
            "csc": sp.csc_matrix,
            "csr_array": sp.csr_array,
            "csc_array": sp.csc_array,
        }[fmt](X)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    batch = draw(st.sampled_from(BATCHES))
    batch_key = None if batch is None else "batch"
    codes = np.arange(n_cells) % 2
    if batch == "int":
        obs["batch"] = codes
    elif batch == "str":
        obs["batch"] = np.where(codes == 0, "a", "b")
    elif batch == "categorical":
        obs["batch"] = pd.Categorical(np.where(codes == 0, "a", "b"), categories=["a", "b", "c"])
    elif batch == "with_nan":
        obs["batch"] = pd.Series(np.where(codes == 0, "a", None), index=obs.index, dtype=object)
    elif batch == "single_cell_batch":
        obs["batch"] = ["a"] * max(n_cells - 1, 0) + ["b"] * min(n_cells, 1)
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    use_layer = draw(st.booleans())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on dtypes and names
        if use_layer:
            adata = anndata.AnnData(np.zeros((n_cells, n_genes), np.float32), obs=obs, var=var)
            adata.layers["counts"] = X
        else:
            adata = anndata.AnnData(X, obs=obs, var=var)
    batch_size = draw(st.sampled_from([4, 16, 2, 3, 1]))
    return adata, ("counts" if use_layer else None), batch_key, batch_size


def _snapshot(adata):
    X = adata.layers["counts"] if "counts" in adata.layers else adata.X
    dense = X.toarray() if sp.issparse(X) else np.array(X, copy=True)
    return dense, type(X), adata.obs.copy(), adata.var_names.copy()


@pytest.mark.filterwarnings("ignore")  # anndata/pyro notes about odd inputs are not the point
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run and machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=user_anndata())
def test_any_input_gives_an_input_error_or_a_fit(case):
    adata, layer, batch_key, batch_size = case
    before = _snapshot(adata)
    try:
        model = SCVI(adata, layer=layer, batch_key=batch_key, n_latent=2, n_hidden=4)
        model.train(
            1,
            batch_size=batch_size,
            progress_bar=False,
            engine=Engine.preset("eager", threads=1),
        )
    except InputError as err:
        message = str(err)
        assert message and "\n" not in message
        event("InputError: " + message[:50])
    else:
        event("fitted")
        assert model.is_trained
        assert np.isfinite(model.history["train_elbo"]).all()
        assert np.isfinite(model.get_latent_representation()).all()
    after = _snapshot(adata)
    # (as float64: assert_array_equal takes NaNs in the same places as equal, but not in
    # object arrays)
    np.testing.assert_array_equal(after[0].astype(np.float64), before[0].astype(np.float64))
    assert after[1] is before[1]
    pd.testing.assert_frame_equal(after[2], before[2])
    assert after[3].equals(before[3])


_QUERY_MODEL = {}


def _query_model():
    """One small trained model for the query properties (built once)."""
    if not _QUERY_MODEL:
        from pyro_scvi.datasets import synthetic_zinb

        adata = synthetic_zinb(n_cells=60, n_genes=8, n_batches=2, seed=4)
        model = SCVI(adata, batch_key="batch", n_latent=2, n_hidden=8)
        model.train(1, progress_bar=False, engine=Engine.preset("eager", threads=1))
        _QUERY_MODEL.update(adata=adata, model=model, z=model.get_latent_representation())
    return _QUERY_MODEL


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@settings(max_examples=25, deadline=None, derandomize=True)
@given(order=st.permutations(range(8)), drop=st.integers(-1, 7), extra=st.booleans())
def test_a_query_is_matched_to_the_model_by_gene_name(order, drop, extra):
    q = _query_model()
    query = q["adata"][:, list(order)].copy()
    if extra:
        query = anndata.concat([query, query[:, :1]], axis=1, merge="same")
        query.var_names = [*query.var_names[:-1], "not_a_model_gene"]
    if drop >= 0:
        query = query[:, [g for g in query.var_names if g != f"gene{drop}"]].copy()
    try:
        z = q["model"].get_latent_representation(query)
    except InputError as err:
        assert (drop >= 0 or extra) and "genes differ" in str(err)
    else:
        assert drop < 0 and not extra
        np.testing.assert_allclose(z, q["z"], rtol=1e-5, atol=1e-6)
