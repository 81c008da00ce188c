"""Tests of pyro_scvi.data: AnnData validation, CountData, minibatching."""

import copy

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_scvi import SCVI, CountData, InputError, from_anndata
from pyro_scvi.data import check_batch_sizes

# ---------------------------------------------------------------------------- helpers

COUNTS = np.array(
    [
        [1, 0, 3, 0],
        [0, 2, 2, 1],
        [5, 0, 0, 0],
        [0, 0, 1, 7],
        [2, 2, 2, 2],
        [0, 9, 0, 0],
    ],
    dtype=np.int64,
)
BATCHES = ["b", "a", "b", "a", "c", "c"]


def _make(matrix, *, batch=BATCHES, layer=None):
    n_cells, n_genes = matrix.shape
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    if batch is not None and n_cells == len(batch):
        obs["batch"] = batch
    var = pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)])
    if layer is None:
        return anndata.AnnData(matrix, obs=obs, var=var)
    adata = anndata.AnnData(np.zeros(matrix.shape, dtype=np.float32), obs=obs, var=var)
    adata.layers[layer] = matrix
    return adata


FORMATS = {
    "dense-int32": lambda m: m.astype(np.int32),
    "dense-int64": lambda m: m.astype(np.int64),
    "dense-uint16": lambda m: m.astype(np.uint16),
    "dense-float32": lambda m: m.astype(np.float32),
    "dense-float64": lambda m: m.astype(np.float64),
    "csr-int32": lambda m: sp.csr_matrix(m.astype(np.int32)),
    "csr-float32": lambda m: sp.csr_matrix(m.astype(np.float32)),
    "csr-float64": lambda m: sp.csr_matrix(m.astype(np.float64)),
    "csc-int64": lambda m: sp.csc_matrix(m.astype(np.int64)),
    "csc-float32": lambda m: sp.csc_matrix(m.astype(np.float32)),
    "csr_array-uint16": lambda m: sp.csr_array(m.astype(np.uint16)),
}


def _dense(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def _snapshot(adata):
    """A deep copy of everything a user could notice changing."""

    def matrix(X):
        if X is None:
            return None
        if sp.issparse(X):
            return (type(X), X.dtype, X.shape, X.data.copy(), X.indices.copy(), X.indptr.copy())
        return (type(X), X.dtype, np.array(X, copy=True))

    return {
        "X": matrix(adata.X),
        "layers": {k: matrix(v) for k, v in adata.layers.items()},
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "uns": copy.deepcopy(dict(adata.uns)),
        "obsm": sorted(adata.obsm.keys()),
        "varm": sorted(adata.varm.keys()),
        "obs_names": adata.obs_names.copy(),
        "var_names": adata.var_names.copy(),
        "shape": adata.shape,
        "is_view": adata.is_view,
    }


def _assert_same_matrix(before, X):
    if before is None:
        assert X is None
        return
    assert type(X) is before[0]
    assert X.dtype == before[1]
    if sp.issparse(X):
        assert X.shape == before[2]
        np.testing.assert_array_equal(X.data, before[3])
        np.testing.assert_array_equal(X.indices, before[4])
        np.testing.assert_array_equal(X.indptr, before[5])
    else:
        np.testing.assert_array_equal(np.asarray(X), before[2])


def _assert_unchanged(adata, snap):
    assert adata.shape == snap["shape"]
    assert adata.is_view == snap["is_view"]
    _assert_same_matrix(snap["X"], adata.X)
    assert sorted(adata.layers.keys()) == sorted(snap["layers"])
    for key, value in snap["layers"].items():
        _assert_same_matrix(value, adata.layers[key])
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    assert sorted(adata.uns.keys()) == sorted(snap["uns"])
    for key, value in snap["uns"].items():
        np.testing.assert_equal(adata.uns[key], value)
    assert sorted(adata.obsm.keys()) == snap["obsm"]
    assert sorted(adata.varm.keys()) == snap["varm"]
    pd.testing.assert_index_equal(adata.obs_names, snap["obs_names"])
    pd.testing.assert_index_equal(adata.var_names, snap["var_names"])


def _ref_log_stats(dense, batch_index, n_batch):
    log_lib = np.log(dense.astype(np.float64).sum(1))
    loc = np.array([log_lib[batch_index == b].mean() for b in range(n_batch)])
    scale = np.array([log_lib[batch_index == b].std(ddof=0) for b in range(n_batch)])
    return loc, scale


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_from_anndata_accepts_formats_and_results_agree(fmt):
    data = from_anndata(_make(FORMATS[fmt](COUNTS)), batch_key="batch")
    assert isinstance(data, CountData)
    assert (data.n_cells, data.n_genes, data.n_batch) == COUNTS.shape + (3,)
    if fmt.startswith("dense"):
        assert isinstance(data.X, np.ndarray)
    else:
        assert sp.issparse(data.X) and data.X.format == "csr"
    assert data.X.dtype == np.float32
    np.testing.assert_array_equal(_dense(data.X), COUNTS.astype(np.float32))
    assert data.batch_categories == ("a", "b", "c")
    np.testing.assert_array_equal(data.batch_index, [1, 0, 1, 0, 2, 2])
    assert data.batch_index.dtype == np.int64
    assert list(data.obs_names) == [f"cell{i}" for i in range(6)]
    assert list(data.var_names) == [f"gene{g}" for g in range(4)]
    # Same library prior whatever the input format.
    ref = from_anndata(_make(COUNTS), batch_key="batch").library_log_stats()
    for got, want in zip(data.library_log_stats(), ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["dense-int32", "csr-float32", "csc-int64"])
def test_named_layer_is_used_instead_of_X(fmt):
    adata = _make(FORMATS[fmt](COUNTS), layer="counts")
    data = from_anndata(adata, layer="counts")
    np.testing.assert_array_equal(_dense(data.X), COUNTS)
    # .X is all zeros: using it instead of the layer would be an error (empty cells).
    with pytest.raises(InputError, match="zero total counts in adata.X"):
        from_anndata(adata)


@pytest.mark.parametrize("kind", ["categorical", "object", "string", "reordered-categorical"])
def test_batch_key_column_types_give_the_same_codes(kind):
    adata = _make(COUNTS)
    if kind == "categorical":
        adata.obs["batch"] = pd.Categorical(BATCHES)
    elif kind == "string":
        adata.obs["batch"] = pd.array(BATCHES, dtype="string")
    elif kind == "reordered-categorical":
        adata.obs["batch"] = pd.Categorical(BATCHES, categories=["c", "b", "a"])
    data = from_anndata(adata, batch_key="batch")
    assert data.batch_categories == ("a", "b", "c")
    np.testing.assert_array_equal(data.batch_index, [1, 0, 1, 0, 2, 2])
    names = np.array(data.batch_categories)[data.batch_index]
    np.testing.assert_array_equal(names, BATCHES)


def test_integer_batch_column_becomes_string_categories():
    adata = _make(COUNTS, batch=None)
    adata.obs["batch"] = [3, 1, 3, 1, 2, 2]
    data = from_anndata(adata, batch_key="batch")
    assert data.batch_categories == ("1", "2", "3")
    np.testing.assert_array_equal(data.batch_index, [2, 0, 2, 0, 1, 1])


def test_no_batch_key_gives_one_batch():
    data = from_anndata(_make(COUNTS))
    assert data.batch_categories == ("0",)
    np.testing.assert_array_equal(data.batch_index, np.zeros(6, dtype=np.int64))


def test_known_batch_categories_fix_the_codes():
    # A query with a subset of the training batches keeps the training codes.
    adata = _make(COUNTS)[[0, 2]].copy()  # only batch "b"
    data = from_anndata(adata, batch_key="batch", batch_categories=["a", "b", "c"])
    assert data.batch_categories == ("a", "b", "c")
    np.testing.assert_array_equal(data.batch_index, [1, 1])


def test_known_var_names_in_the_same_order_are_accepted():
    adata = _make(COUNTS)
    data = from_anndata(adata, var_names=list(adata.var_names))
    assert list(data.var_names) == list(adata.var_names)


# ---------------------------------------------------------------------------- bad values


def _with_value(matrix_fmt, value):
    m = COUNTS.astype(np.float64)
    m[1, 2] = value
    return sp.csr_matrix(m) if matrix_fmt == "sparse" else m


@pytest.mark.parametrize("matrix_fmt", ["dense", "sparse"])
@pytest.mark.parametrize(
    ("value", "match"),
    [
        (-1.0, r"negative values \(min -1\).*Pass the raw counts"),
        (0.5, r"non-integer values \(e\.g\. 0\.5\).*raw counts.*layer="),
        (np.nan, r"1 NaN or infinite values.*raw counts"),
        (np.inf, r"1 NaN or infinite values.*raw counts"),
        (-np.inf, r"1 NaN or infinite values"),
    ],
    ids=["negative", "fractional", "nan", "inf", "-inf"],
)
def test_bad_values_raise_input_error(matrix_fmt, value, match):
    adata = _make(_with_value(matrix_fmt, value))
    with pytest.raises(InputError, match=match):
        from_anndata(adata)


@pytest.mark.parametrize("matrix_fmt", ["dense", "sparse"])
def test_negative_integer_counts_raise(matrix_fmt):
    m = COUNTS.astype(np.int32)
    m[0, 0] = -3
    X = sp.csr_matrix(m) if matrix_fmt == "sparse" else m
    with pytest.raises(InputError, match=r"negative values \(min -3\)"):
        from_anndata(_make(X))


@pytest.mark.parametrize("matrix_fmt", ["dense", "sparse"])
def test_log_normalized_data_is_rejected_with_a_hint(matrix_fmt):
    logged = np.log1p(COUNTS / COUNTS.sum(1, keepdims=True) * 1e4)
    X = sp.csr_matrix(logged) if matrix_fmt == "sparse" else logged
    with pytest.raises(InputError, match=r"non-integer.*not normalized or log-transformed"):
        from_anndata(_make(X))


def test_non_numeric_values_raise():
    adata = _make(COUNTS)
    adata.layers["text"] = COUNTS.astype(str)
    with pytest.raises(InputError, match="numeric raw counts"):
        from_anndata(adata, layer="text")


def test_X_none_asks_for_a_layer():
    adata = anndata.AnnData(obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["g"]))
    with pytest.raises(InputError, match=r"adata.X is empty \(None\); pass layer="):
        from_anndata(adata)


@pytest.mark.parametrize("matrix_fmt", ["dense", "sparse"])
@pytest.mark.parametrize("shape", [(0, 4), (6, 0)], ids=["0-cells", "0-genes"])
def test_empty_matrix_raises(matrix_fmt, shape):
    m = np.zeros(shape, dtype=np.float32)
    X = sp.csr_matrix(m) if matrix_fmt == "sparse" else m
    adata = _make(X, batch=None)
    with pytest.raises(InputError, match=rf"is empty \({shape[0]} cells x {shape[1]} genes\)"):
        from_anndata(adata)


@pytest.mark.parametrize("matrix_fmt", ["dense", "sparse"])
def test_empty_cells_are_counted_and_removal_is_suggested(matrix_fmt):
    m = COUNTS.copy()
    m[[1, 4]] = 0
    X = sp.csr_matrix(m) if matrix_fmt == "sparse" else m
    with pytest.raises(InputError, match=r"2 of 6 cells have zero total counts.*Remove them"):
        from_anndata(_make(X))
    data = from_anndata(_make(X), allow_empty_cells=True)
    assert data.n_cells == 6


def test_missing_layer_lists_the_available_ones():
    adata = _make(COUNTS, layer="raw")
    with pytest.raises(InputError, match=r"Layer 'counts' not found.*available: 'raw'"):
        from_anndata(adata, layer="counts")


def test_missing_batch_key_names_the_columns():
    adata = _make(COUNTS)
    with pytest.raises(InputError, match=r"batch_key 'sample' is not a column.*'batch'"):
        from_anndata(adata, batch_key="sample")


@pytest.mark.parametrize("kind", ["object", "categorical"])
def test_missing_batch_values_raise(kind):
    values = ["a", None, "b", "a", np.nan, "b"]
    adata = _make(COUNTS, batch=None)
    adata.obs["batch"] = pd.Categorical(values) if kind == "categorical" else values
    with pytest.raises(InputError, match=r"has 2 missing values; give every cell a batch"):
        from_anndata(adata, batch_key="batch")


def test_different_genes_raise():
    adata = _make(COUNTS)
    known = ["gene0", "gene1", "gene2", "other"]
    with pytest.raises(InputError, match=r"1 of its 4 genes are missing.*'other'"):
        from_anndata(adata, var_names=known)


def test_extra_genes_raise_with_a_fix_that_works():
    adata = _make(COUNTS)
    known = ["gene3", "gene2", "gene1"]
    with pytest.raises(InputError, match=r"extra.*adata\[:, model\.var_names\]\.copy\(\)") as info:
        from_anndata(adata, var_names=known)
    # the fix the message names, run as written (model.var_names is a pandas Index)
    fix = str(info.value).split("`")[1]
    scope = {"adata": adata, "model": type("M", (), {"var_names": pd.Index(known)})}
    exec(fix, scope)
    data = from_anndata(scope["adata"], var_names=known, allow_empty_cells=True)
    assert list(data.var_names) == known


def test_same_genes_in_another_order_are_matched_by_name():
    adata = _make(COUNTS)
    order = list(reversed(adata.var_names))
    data = from_anndata(adata, var_names=order)
    assert list(data.var_names) == order
    np.testing.assert_array_equal(np.asarray(data.X), np.asarray(COUNTS)[:, ::-1])
    assert list(adata.var_names) == [f"gene{i}" for i in range(COUNTS.shape[1])]  # untouched


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicated_gene_names_are_refused_with_the_fix():
    adata = _make(COUNTS)
    adata.var_names = ["gene0", "gene1", "gene0"][: adata.n_vars] + [
        f"g{i}" for i in range(3, adata.n_vars)
    ]
    with pytest.raises(
        InputError, match=r"duplicated gene names.*adata\.var_names_make_unique\(\)"
    ):
        from_anndata(adata)
    fixed = adata.copy()
    fixed.var_names_make_unique()
    assert from_anndata(fixed).n_genes == adata.n_vars


def test_unseen_batch_raises():
    adata = _make(COUNTS)
    with pytest.raises(InputError, match=r"\['c'\].*not seen in training"):
        from_anndata(adata, batch_key="batch", batch_categories=["a", "b"])


def test_model_with_batches_needs_a_batch_key():
    with pytest.raises(InputError, match="pass the batch_key"):
        from_anndata(_make(COUNTS), batch_categories=["a", "b"])


def test_not_an_anndata_raises():
    with pytest.raises(InputError, match="Expected an AnnData"):
        from_anndata(COUNTS)


def test_check_batch_sizes():
    data = from_anndata(_make(COUNTS), batch_key="batch")
    check_batch_sizes(data, 2)  # every batch has 2 cells
    lonely = _make(COUNTS, batch=["a", "a", "b", "b", "b", "c"])
    with pytest.raises(InputError, match=r"fewer than 2 cells: \[\('c', 1\)\].*merge"):
        check_batch_sizes(from_anndata(lonely, batch_key="batch"), 128)


@pytest.mark.parametrize("batch_size", [1, 0, -5])
def test_check_batch_sizes_rejects_tiny_minibatches(batch_size):
    data = from_anndata(_make(COUNTS), batch_key="batch")
    with pytest.raises(InputError, match=rf"batch_size={batch_size}.*>= 2 cells"):
        check_batch_sizes(data, batch_size)


def test_scvi_train_rejects_a_single_cell_batch():
    adata = _make(COUNTS, batch=["a", "a", "b", "b", "b", "c"])
    with pytest.raises(InputError, match="fewer than 2 cells"):
        SCVI(adata, batch_key="batch", n_hidden=8).train(1, progress_bar=False)


# ---------------------------------------------------------------------------- no side effects


@pytest.fixture(params=["csr-int32", "csr-float32", "dense-float32"])
def user_adata(request, small_adata):
    """small_adata with a layer, obsm, varm and uns; float32 variants share memory with data."""
    adata = small_adata
    X = adata.X.toarray()
    if request.param == "csr-float32":
        adata.X = sp.csr_matrix(X.astype(np.float32))
    elif request.param == "dense-float32":
        adata.X = X.astype(np.float32)
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_pca"] = np.random.default_rng(1).normal(size=(adata.n_obs, 3))
    adata.varm["loadings"] = np.ones((adata.n_vars, 2))
    adata.uns["note"] = {"a": 1, "b": [1, 2]}
    return adata


def test_from_anndata_does_not_modify_the_input(user_adata):
    snap = _snapshot(user_adata)
    from_anndata(user_adata, batch_key="batch")
    from_anndata(user_adata, layer="counts", batch_key="batch")
    _assert_unchanged(user_adata, snap)


def test_scvi_training_does_not_modify_the_input(user_adata):
    snap = _snapshot(user_adata)
    model = SCVI(user_adata, batch_key="batch", n_latent=2, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, progress_bar=False)
    z = model.get_latent_representation()
    model.get_normalized_expression(n_samples=1)
    assert z.shape == (user_adata.n_obs, 2)
    _assert_unchanged(user_adata, snap)


def test_non_canonical_csr_input_is_not_modified():
    # Unsorted column indices: an in-place sort_indices() on shared arrays would show.
    m = sp.csr_matrix(
        (
            np.array([3.0, 1.0, 2.0, 2.0, 5.0], dtype=np.float32),
            np.array([2, 0, 3, 1, 0]),
            np.array([0, 2, 4, 5]),
        ),
        shape=(3, 4),
    )
    m.has_sorted_indices = False
    adata = _make(m, batch=None)
    snap = _snapshot(adata)
    data = from_anndata(adata)
    x, _ = data.tensors(np.array([2, 0, 1]))
    np.testing.assert_array_equal(x.numpy(), m.toarray()[[2, 0, 1]])
    assert data.library_log_stats()[0].shape == (1,)
    _assert_unchanged(adata, snap)


# ---------------------------------------------------------------------------- library stats


def test_library_log_stats_match_numpy_per_batch(small_adata):
    data = from_anndata(small_adata, batch_key="batch")
    loc, scale = data.library_log_stats()
    codes = pd.Categorical(small_adata.obs["batch"].astype(str)).codes
    ref_loc, ref_scale = _ref_log_stats(small_adata.X.toarray(), codes, 2)
    assert loc.shape == scale.shape == (2,)
    np.testing.assert_allclose(loc, ref_loc, rtol=1e-5)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-4)


def test_library_log_stats_on_hand_computed_values():
    m = np.zeros((5, 2))
    m[:, 0] = [1, 9, 2, 8, 4]  # totals per cell
    data = from_anndata(_make(m, batch=["x", "y", "x", "y", "x"]), batch_key="batch")
    loc, scale = data.library_log_stats()
    x, y = np.log([1, 2, 4]), np.log([9, 8])
    np.testing.assert_allclose(loc, [x.mean(), y.mean()], rtol=1e-6)
    np.testing.assert_allclose(scale, [x.std(), y.std()], rtol=1e-5)


def test_library_log_stats_floor_when_all_libraries_equal():
    m = np.array([[2, 3], [1, 4], [5, 0]])
    loc, scale = from_anndata(_make(m, batch=None)).library_log_stats()
    np.testing.assert_allclose(loc, [np.log(5)], rtol=1e-6)
    np.testing.assert_allclose(scale, [1e-3])


# ---------------------------------------------------------------------------- minibatches


@pytest.mark.parametrize("n", [1, 2, 10, 11, 12])
@pytest.mark.parametrize("batch_size", [2, 5])
@pytest.mark.parametrize("shuffle", [False, True])
def test_minibatches_cover_every_index_once(n, batch_size, shuffle):
    data = from_anndata(_make(COUNTS))
    indices = np.arange(100, 100 + n)
    chunks = list(
        data.minibatches(indices, batch_size, shuffle=shuffle, rng=np.random.default_rng(0))
    )
    np.testing.assert_array_equal(np.sort(np.concatenate(chunks)), indices)
    assert all(len(c) == batch_size for c in chunks[:-1])
    assert 1 <= len(chunks[-1]) <= batch_size
    assert len(chunks) == -(-n // batch_size)
    if not shuffle:
        np.testing.assert_array_equal(np.concatenate(chunks), indices)


@pytest.mark.parametrize(
    ("n", "batch_size", "sizes"),
    [
        (11, 5, [5, 6]),
        (3, 2, [3]),
        (6, 5, [6]),
        (10, 5, [5, 5]),
        (12, 5, [5, 5, 2]),
        (1, 5, [1]),
    ],
)
def test_minibatches_merge_a_trailing_singleton(n, batch_size, sizes):
    data = from_anndata(_make(COUNTS))
    indices = np.arange(n)
    kept = list(data.minibatches(indices, batch_size, drop_singleton=False))
    assert sum(len(c) for c in kept) == n
    chunks = list(data.minibatches(indices, batch_size, drop_singleton=True))
    assert [len(c) for c in chunks] == sizes
    np.testing.assert_array_equal(np.concatenate(chunks), indices)


def test_shuffled_minibatches_with_merged_singleton_cover_every_index_once():
    data = from_anndata(_make(COUNTS))
    indices = np.arange(21)
    rng = np.random.default_rng(0)
    chunks = list(data.minibatches(indices, 4, shuffle=True, rng=rng, drop_singleton=True))
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 5]
    np.testing.assert_array_equal(np.sort(np.concatenate(chunks)), indices)


def test_training_when_the_last_minibatch_would_be_one_cell(small_adata):
    # 300 training cells in minibatches of 299: the second minibatch has a single cell.
    model = SCVI(small_adata, n_latent=2, n_hidden=8)
    model.train(max_epochs=1, batch_size=299, train_size=1.0, progress_bar=False)
    assert len(model.history) == 1


def test_minibatch_shuffle_is_reproducible_with_a_seeded_rng():
    data = from_anndata(_make(COUNTS))
    idx = np.arange(50)

    def order(seed):
        rng = np.random.default_rng(seed)
        return np.concatenate(list(data.minibatches(idx, 7, shuffle=True, rng=rng)))

    np.testing.assert_array_equal(order(3), order(3))
    assert not np.array_equal(order(3), order(4))
    assert not np.array_equal(order(3), idx)


@pytest.mark.parametrize("fmt", ["dense-int32", "csr-float32", "csc-int64"])
def test_tensors_match_dense_rows(fmt):
    data = from_anndata(_make(FORMATS[fmt](COUNTS)), batch_key="batch")
    idx = np.array([4, 0, 5, 0])
    x, b = data.tensors(idx)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert b.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy(), COUNTS[idx])
    np.testing.assert_array_equal(b.numpy(), data.batch_index[idx])


# ---------------------------------------------------------------------------- SCVI empty cells


def test_scvi_rejects_empty_cells_by_default(small_adata):
    X = small_adata.X.toarray()
    X[[3, 7]] = 0
    small_adata.X = sp.csr_matrix(X)
    with pytest.raises(InputError, match="2 of 300 cells have zero total counts"):
        SCVI(small_adata)


@pytest.mark.parametrize("layer", [None, "counts"])
def test_scvi_drop_empty_cells(small_adata, layer):
    adata = small_adata
    X = adata.X.toarray()
    X[[3, 7, 100]] = 0
    if layer is None:
        adata.X = sp.csr_matrix(X)
    else:
        adata.layers[layer] = sp.csr_matrix(X)
    snap = _snapshot(adata)
    model = SCVI(adata, layer=layer, batch_key="batch", drop_empty_cells=True, n_hidden=16)
    assert model.data.n_cells == 297
    assert not {"cell3", "cell7", "cell100"} & set(model.data.obs_names)
    model.train(max_epochs=1, batch_size=64, progress_bar=False)
    assert model.get_latent_representation().shape == (297, 10)
    _assert_unchanged(adata, snap)


@pytest.mark.parametrize("sparse", [True, False])
def test_counts_gathered_on_the_device_equal_the_host_gather(sparse):
    rng = np.random.default_rng(0)
    dense = rng.poisson(rng.gamma(0.3, 2.0, size=(40, 25))).astype(np.float32)
    dense[5] = 0  # an empty row
    dense[7] = rng.poisson(5.0, size=25) + 1  # a row with every gene stored: the widest
    X = sp.csr_matrix(dense) if sparse else dense
    data = from_anndata(anndata.AnnData(X), allow_empty_cells=True)
    resident = data.to_device("cpu")
    assert resident.n_cells == 40 and resident.n_genes == 25
    for idx in (rng.permutation(40), np.array([7, 5, 7, 0]), np.array([5])):
        x, b = resident.tensors(idx)
        x_host, b_host = data.tensors(idx)
        assert torch.equal(x, x_host) and torch.equal(b, b_host)
        np.testing.assert_array_equal(x.numpy(), dense[idx])


def test_resident_bytes_count_what_the_device_holds():
    X = sp.random(30, 10, density=0.2, format="csr", random_state=0)
    X.data = np.ceil(X.data * 5).astype(np.float32)
    data = from_anndata(anndata.AnnData(X), allow_empty_cells=True)
    resident = data.to_device("cpu")
    held = sum(
        t.numel() * t.element_size()
        for t in (resident.indptr, resident.indices, resident.values, resident.batch_index)
    )
    assert data.resident_bytes() == held


# --- streamed from a backed .h5ad -------------------------------------------------------


@pytest.fixture
def backed(tmp_path):
    from pyro_scvi.datasets.synthetic_large import write_synthetic_h5ad

    path = write_synthetic_h5ad(tmp_path / "s.h5ad", 700, 30, chunk=250, seed=3)
    return anndata.read_h5ad(path, backed="r")


def test_streamed_counts_read_what_the_loaded_counts_hold(backed):
    from pyro_scvi.data import StreamedCounts

    streamed = from_anndata(backed, batch_key="batch", streamed=True)
    loaded = from_anndata(backed.to_memory(), batch_key="batch")
    assert isinstance(streamed, StreamedCounts) and streamed.source_reason == "streamed: asked for"
    np.testing.assert_array_equal(streamed.total_counts(), loaded.total_counts())
    for a, b in zip(streamed.library_log_stats(), loaded.library_log_stats(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert streamed.batch_categories == loaded.batch_categories
    rng, n = np.random.default_rng(0), backed.n_obs
    for idx in (rng.permutation(n)[:50], np.arange(100, 180), np.array([n - 1, 0])):
        x, b = streamed.tensors(idx)
        x_ref, b_ref = loaded.tensors(idx)
        assert torch.equal(x, x_ref) and torch.equal(b, b_ref)
    with pytest.raises(InputError, match="to_memory"):
        streamed.X  # noqa: B018


def test_block_shuffled_minibatches_visit_every_cell_once_from_few_blocks(backed):
    streamed = from_anndata(backed, batch_key="batch", streamed=True)
    streamed.block_cells, streamed.read_ahead_blocks = 32, 3
    loaded = from_anndata(backed.to_memory(), batch_key="batch")
    n = backed.n_obs
    assert n > 600  # a few cells drew no counts and were left out of the file
    cells = np.sort(np.random.default_rng(1).permutation(n)[:601])  # a training subset
    rng = np.random.default_rng(0)
    batches = list(streamed.minibatches(cells, 40, shuffle=True, rng=rng, drop_singleton=True))
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), cells)
    assert all(len(b) == 40 for b in batches[:-1]) and 1 < len(batches[-1]) <= 41
    # listed ahead (as a resumable run does), read a group of blocks at a time
    reads = []
    read = streamed.read
    streamed.read = lambda a, b: reads.append((a, b)) or read(a, b)
    for b in batches:
        x, _ = streamed.tensors(b)
        assert torch.equal(x, loaded.tensors(b)[0])
    n_blocks = -(-n // 32)
    assert all(b - a <= 32 for a, b in reads)  # block reads, no scattered rows
    assert len(reads) <= 2 * n_blocks  # each block about once (twice where groups meet)
    # an in-order pass after it (validation, queries) reads ahead in spans of 3 blocks:
    # each cell once, but a minibatch that crosses a span's end (here at most 39 cells)
    reads.clear()
    for b in streamed.minibatches(np.arange(n), 40):
        assert torch.equal(streamed.tensors(b)[0], loaded.tensors(b)[0])
    assert all(b - a == 96 or b == n for a, b in reads)
    assert sum(b - a for a, b in reads) <= n + 39 * len(reads)
    assert len(reads) <= -(-n // (96 - 39))
    # shuffled: consecutive minibatches differ from the file order, and epochs differ
    again = list(streamed.minibatches(cells, 40, shuffle=True, rng=rng))
    assert not np.array_equal(np.concatenate(batches), np.concatenate(again))
    assert not np.array_equal(np.concatenate(batches), cells)


def test_streamed_files_get_the_same_checks(tmp_path):
    X = sp.csr_matrix(np.array([[1.0, 2.0], [0.0, 3.0], [2.0, -1.0]], dtype=np.float32))
    path = tmp_path / "bad.h5ad"
    anndata.AnnData(X).write_h5ad(path)
    with pytest.raises(InputError, match="negative values"):
        from_anndata(anndata.read_h5ad(path, backed="r"), streamed=True)
    good = anndata.AnnData(sp.csr_matrix(np.ones((3, 2), dtype=np.float32)))
    good.layers["counts"] = good.X.copy()
    good.write_h5ad(path)
    with pytest.raises(InputError, match="adata.X only"):
        from_anndata(anndata.read_h5ad(path, backed="r"), layer="counts", streamed=True)
    with pytest.raises(InputError, match="backed AnnData"):
        from_anndata(good, streamed=True)


def test_the_engine_streams_a_backed_file_only_when_it_would_not_fit(backed, monkeypatch):
    from pyro_scvi.data import StreamedCounts, placement

    nbytes = 8 * backed.X.group["data"].shape[0] + 8 * (backed.n_obs + 1)
    monkeypatch.setattr(placement, "available_memory", lambda: 4 * nbytes)
    loaded = from_anndata(backed)
    assert isinstance(loaded, CountData) and loaded.source_reason.startswith("memory: counts")
    monkeypatch.setattr(placement, "available_memory", lambda: nbytes)
    assert isinstance(from_anndata(backed), StreamedCounts)


def test_a_model_trains_and_answers_queries_from_a_streamed_file(backed, tmp_path):
    model = SCVI(backed, batch_key="batch", n_hidden=16, n_latent=3, streamed=True)
    model.data.block_cells = 64
    model.train(3, progress_bar=False, seed=0, engine="eager")
    assert model.engine["reasons"]["data_source"] == "streamed: asked for"
    # a checkpoint of a streamed model, continued: the data check reads totals, not X
    model.train(1, progress_bar=False, checkpoint_dir=tmp_path / "ck", checkpoint_every=1)
    again = SCVI.load_checkpoint(tmp_path / "ck", backed, device="cpu")
    assert len(again.history) == 4 and not again.interrupted
    assert np.isfinite(model.history["validation_elbo"]).all()
    z = model.get_latent_representation()
    assert z.shape == (backed.n_obs, 3) and np.isfinite(z).all()
