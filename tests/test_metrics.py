import math

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import silhouette_samples, silhouette_score

from pyro_scvi.analysis import metrics

LOG2 = math.log(2.0)


def mixed_batches(rng, n=400, dim=5):
    """One Gaussian blob, two batches drawn independently of position."""
    z = rng.normal(size=(n, dim))
    return z, rng.permutation(np.repeat(["b1", "b2"], n // 2))


def separated_batches(rng, n=400, dim=5):
    """Two batches in two distant blobs."""
    b = np.repeat(["b1", "b2"], n // 2)
    return rng.normal(size=(n, dim)) + np.where(b == "b1", 0.0, 30.0)[:, None], b


def blobs(rng, n_types=3, per_type=60, dim=4):
    labels = np.repeat(np.arange(n_types), per_type)
    centers = 20.0 * np.eye(n_types, dim)
    return centers[labels] + rng.normal(size=(len(labels), dim)), labels


# --- entropy_batch_mixing ----------------------------------------------------------------


def test_entropy_mixed_batches_near_log2(rng):
    z, b = mixed_batches(rng)
    assert metrics.entropy_batch_mixing(z, b) == pytest.approx(LOG2, abs=0.05)


def test_entropy_separated_batches_near_zero(rng):
    z, b = separated_batches(rng)
    assert metrics.entropy_batch_mixing(z, b) < 0.01


def test_entropy_hand_computed():
    # Cells 0..2 (batches a, b, a) far from cells 3..5 (all a). With 2 neighbours cell 0
    # sees {1, 2} = {b, a} and cell 2 sees {1, 0} = {b, a}: entropy log 2; cell 1 sees
    # {0, 2} = {a, a} and cells 3..5 see only a: entropy 0. All 6 cells are drawn.
    latent = np.array([[0.0], [1.0], [2.0], [100.0], [101.0], [102.0]])
    batches = ["a", "b", "a", "a", "a", "a"]
    h = metrics.entropy_batch_mixing(latent, batches, n_neighbors=2, n_cells=6, n_repeats=3)
    assert h == pytest.approx(2 * LOG2 / 6)


def test_entropy_three_batches_entropy_uses_all_proportions():
    # Each cell's 2 neighbours (the other two cells of its group) are from two other
    # batches: entropy log 2, although there are 3 batches.
    latent = np.array([[0.0], [0.5], [1.0], [50.0], [50.5], [51.0]])
    batches = [0, 1, 2, 0, 1, 2]
    h = metrics.entropy_batch_mixing(latent, batches, n_neighbors=2, n_cells=6, n_repeats=1)
    assert h == pytest.approx(LOG2)


def test_entropy_excludes_self_with_duplicate_points():
    # Cells 0..2 coincide (batches a, b, b): a cell's 2 neighbours are the other two, at
    # distance 0 like the cell itself, so dropping "the first hit" instead of the cell
    # itself could keep the cell. Cell 0 sees {b, b}: 0; cells 1, 2 see {a, b}: log 2.
    # Cells 3..5 (all a) see only a.
    latent = np.array([[0.0], [0.0], [0.0], [10.0], [10.5], [11.0]])
    batches = ["a", "b", "b", "a", "a", "a"]
    h = metrics.entropy_batch_mixing(latent, batches, n_neighbors=2, n_cells=6, n_repeats=1)
    assert h == pytest.approx(2 * LOG2 / 6)


def test_entropy_clips_neighbors_and_cells(rng):
    z, b = mixed_batches(rng, n=20)
    h = metrics.entropy_batch_mixing(z, b, n_neighbors=500, n_cells=500, n_repeats=2)
    # every cell sees all 19 others: 10 of the other batch, 9 of its own
    expected = -(9 / 19 * math.log(9 / 19) + 10 / 19 * math.log(10 / 19))
    assert h == pytest.approx(expected)


def test_entropy_seeded_reproducible(rng):
    z, b = mixed_batches(rng)
    a = metrics.entropy_batch_mixing(z, b, n_cells=20, n_repeats=3, seed=1)
    assert a == metrics.entropy_batch_mixing(z, b, n_cells=20, n_repeats=3, seed=1)
    assert a != metrics.entropy_batch_mixing(z, b, n_cells=20, n_repeats=3, seed=2)


@pytest.mark.parametrize(
    ("latent", "batches", "kwargs", "match"),
    [
        (np.zeros((4, 2)), ["a", "b", "a"], {}, "3 entries but latent has 4 cells"),
        (np.zeros((4, 2)), ["a"] * 4, {}, "at least 2 batches"),
        (np.zeros(4), ["a", "b"] * 2, {}, "must be 2-D"),
        (np.array([[0.0], [np.nan], [1.0], [2.0]]), ["a", "b"] * 2, {}, "non-finite"),
        (np.zeros((4, 2)), ["a", None, "b", "a"], {}, "missing values"),
        (np.zeros((4, 2)), ["a", "b"] * 2, {"n_neighbors": 0}, "n_neighbors must be"),
        (np.zeros((4, 2)), ["a", "b"] * 2, {"n_repeats": 1.5}, "n_repeats must be"),
    ],
)
def test_entropy_validates(latent, batches, kwargs, match):
    with pytest.raises(ValueError, match=match):
        metrics.entropy_batch_mixing(latent, batches, **kwargs)


# --- silhouette -------------------------------------------------------------------------


@pytest.mark.parametrize("sample_size", [None, 50])
def test_silhouette_matches_sklearn(rng, sample_size):
    z, labels = blobs(rng)
    expected = silhouette_score(z, labels, sample_size=sample_size, random_state=3)
    got = metrics.silhouette(z, labels.astype(str), sample_size=sample_size, seed=3)
    assert got == pytest.approx(expected)
    assert got > 0.8


def test_silhouette_needs_two_labels(rng):
    with pytest.raises(ValueError, match="between 2 and n_cells - 1"):
        metrics.silhouette(rng.normal(size=(10, 2)), ["a"] * 10)


# --- batch_silhouette -------------------------------------------------------------------


def test_batch_silhouette_mixed_near_one(rng):
    z, b = mixed_batches(rng)
    assert metrics.batch_silhouette(z, b) > 0.9


def test_batch_silhouette_separated_near_zero(rng):
    z, b = separated_batches(rng)
    assert metrics.batch_silhouette(z, b) < 0.1


def test_batch_silhouette_within_cell_types(rng):
    # Two distant cell types; within each, the two batches overlap. Without labels the
    # cell types do not hurt (each type holds both batches); with labels the score is the
    # unweighted mean of the types' scores, computed by hand here.
    z, types = blobs(rng, n_types=2, per_type=100)
    b = np.tile(["b1", "b2"], 100)
    per_type = [
        np.mean(1 - np.abs(silhouette_samples(z[types == t], b[types == t]))) for t in (0, 1)
    ]
    assert metrics.batch_silhouette(z, b, types) == pytest.approx(np.mean(per_type))
    assert metrics.batch_silhouette(z, b, types) > 0.9


def test_batch_silhouette_skips_single_batch_types(rng):
    z, types = blobs(rng, n_types=2, per_type=50)
    # type 0 in batches b1/b2 (mixed), type 1 only in b3: skipped, so its perfect
    # separation from the other batches does not count
    b = np.where(types == 0, np.tile(["b1", "b2"], 50), "b3")
    only_type0 = metrics.batch_silhouette(z[types == 0], b[types == 0])
    assert metrics.batch_silhouette(z, b, types) == pytest.approx(only_type0)


def test_batch_silhouette_confounded_raises(rng):
    z, types = blobs(rng, n_types=2, per_type=10)
    with pytest.raises(ValueError, match="confounded"):
        metrics.batch_silhouette(z, types, types)


# --- clustering_scores ------------------------------------------------------------------


def test_clustering_perfect_on_separated_blobs(rng):
    z, labels = blobs(rng)
    scores = metrics.clustering_scores(z, labels)
    assert scores == {"ari": pytest.approx(1.0), "nmi": pytest.approx(1.0)}


def test_clustering_near_zero_on_random_labels(rng):
    z, _ = blobs(rng)
    scores = metrics.clustering_scores(z, rng.integers(0, 3, size=len(z)))
    assert abs(scores["ari"]) < 0.05
    assert scores["nmi"] < 0.05


def test_clustering_n_clusters_override(rng):
    z, labels = blobs(rng, n_types=4)
    merged = np.minimum(labels, 2)  # 3 labels, but 4 clusters requested
    scores = metrics.clustering_scores(z, merged, n_clusters=4)
    assert scores["ari"] < 1.0 and scores["nmi"] < 1.0
    with pytest.raises(ValueError, match="exceeds the number of cells"):
        metrics.clustering_scores(z, labels, n_clusters=len(z) + 1)


# --- corrupt_counts ---------------------------------------------------------------------


@pytest.fixture
def counts(rng):
    x = rng.poisson(2.0, size=(50, 30))
    x[rng.random(x.shape) < 0.5] = 0
    return x


@pytest.mark.parametrize("scheme", ["uniform", "zero", "binomial"])
@pytest.mark.parametrize("rate", [0.1, 0.25])
def test_corrupt_hides_round_rate_nnz(counts, scheme, rate):
    before = counts.copy()
    y, (rows, cols) = metrics.corrupt_counts(counts, scheme=scheme, rate=rate)
    np.testing.assert_array_equal(counts, before)  # input untouched
    nnz = np.count_nonzero(counts)
    assert len(rows) == len(cols) == round(rate * nnz)
    assert len(set(zip(rows, cols, strict=True))) == len(rows)  # distinct entries
    assert (counts[rows, cols] > 0).all()
    assert y.dtype == np.float32 and y.shape == counts.shape
    hidden = np.zeros(counts.shape, dtype=bool)
    hidden[rows, cols] = True
    np.testing.assert_array_equal(y[~hidden], counts[~hidden])  # the rest is unchanged
    if scheme == "binomial":
        assert (y[hidden] <= counts[hidden]).all()
        assert (y[hidden] < counts[hidden]).any()
        assert y[hidden].sum() == pytest.approx(0.2 * counts[hidden].sum(), rel=0.5)
    else:
        assert (y[hidden] == 0).all()


@pytest.mark.parametrize("scheme", ["uniform", "binomial"])
def test_corrupt_sparse_same_as_dense(counts, scheme):
    x = sp.csr_matrix(counts)
    before = x.copy()
    y_sparse, where_sparse = metrics.corrupt_counts(x, scheme=scheme, seed=4)
    y_dense, where_dense = metrics.corrupt_counts(counts, scheme=scheme, seed=4)
    assert (x != before).nnz == 0
    np.testing.assert_array_equal(y_sparse, y_dense)
    np.testing.assert_array_equal(where_sparse, where_dense)


def test_corrupt_seeded(counts):
    a = metrics.corrupt_counts(counts, scheme="binomial", seed=1)
    b = metrics.corrupt_counts(counts, scheme="binomial", seed=1)
    c = metrics.corrupt_counts(counts, scheme="binomial", seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1][0], c[1][0])


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.ones((3, 3)), {"scheme": "dropout"}, "choose one of"),
        (np.ones((3, 3)), {"rate": 1.5}, "rate="),
        (np.ones((3, 3)), {"binomial_p": -0.1}, "binomial_p="),
        (-np.ones((3, 3)), {}, "negative"),
        (np.full((3, 3), 0.5), {"scheme": "binomial"}, "non-integer"),
        (np.ones(3), {}, "2-D"),
    ],
)
def test_corrupt_validates(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        metrics.corrupt_counts(x, **kwargs)


# --- imputation_error -------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_imputation_error_hand_example(sparse):
    original = np.array([[4, 0, 1], [2, 6, 0]])
    imputed = np.array([[3.0, 9.0, 1.0], [2.5, 10.0, 7.0]])
    where = (np.array([0, 0, 1, 1]), np.array([0, 2, 0, 1]))
    # errors 1, 0, 0.5, 4 -> median 0.75; the unhidden entries (errors 9, 7) do not count
    orig = sp.csr_matrix(original) if sparse else original
    assert metrics.imputation_error(imputed, orig, where) == pytest.approx(0.75)


def test_imputation_error_roundtrip(counts):
    y, where = metrics.corrupt_counts(counts)
    assert metrics.imputation_error(counts, counts, where) == 0.0
    assert metrics.imputation_error(y, counts, where) == np.median(counts[where])


@pytest.mark.parametrize(
    ("imputed", "where", "match"),
    [
        (np.zeros((2, 3)), ([0], [0]), "shape"),
        (np.zeros((2, 2)), ([0, 1], [0]), "pair up"),
        (np.zeros((2, 2)), ([], []), "empty"),
        (np.zeros((2, 2)), ([0, 5], [0, 0]), "outside"),
        (np.zeros((2, 2)), ([0],), "pair"),
    ],
)
def test_imputation_error_validates(imputed, where, match):
    with pytest.raises(ValueError, match=match):
        metrics.imputation_error(imputed, np.ones((2, 2)), where)


# --- score_latent and score -------------------------------------------------------------


def test_score_latent_keys_and_values(rng):
    z, labels = blobs(rng, n_types=2, per_type=100)
    batches = np.tile(["b1", "b2"], 100)
    s = metrics.score_latent(z, labels, batches)
    assert set(s) == {"ari", "nmi", "silhouette_label", "entropy_batch_mixing", "batch_silhouette"}
    assert s["ari"] == pytest.approx(1.0)
    assert s["silhouette_label"] == pytest.approx(metrics.silhouette(z, labels))
    assert s["entropy_batch_mixing"] == pytest.approx(LOG2, abs=0.05)
    assert s["batch_silhouette"] == pytest.approx(metrics.batch_silhouette(z, batches, labels))
    assert set(metrics.score_latent(z, labels)) == {"ari", "nmi", "silhouette_label"}
    assert set(metrics.score_latent(z, batches=batches)) == {
        "entropy_batch_mixing",
        "batch_silhouette",
    }
    assert metrics.score_latent(z, batches=["b1"] * len(z)) == {}  # one batch: no mixing


def test_score_latent_undefined_is_nan(rng):
    z, labels = blobs(rng, n_types=2, per_type=20)
    s = metrics.score_latent(z, labels=np.zeros(len(z)), batches=labels)
    assert math.isnan(s["silhouette_label"])
    s = metrics.score_latent(z, labels=labels, batches=labels)  # batch == cell type
    assert math.isnan(s["batch_silhouette"])


@pytest.fixture
def scored_adata(rng):
    z, labels = blobs(rng, n_types=2, per_type=40)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.where(labels == 0, "T", "B")),
            "batch": np.tile(["b1", "b2"], 40),
        },
        index=[f"c{i}" for i in range(len(z))],
    )
    adata = anndata.AnnData(obs=obs)
    adata.obsm["X_pyro_scvi"] = z
    adata.obsm["X_pca"] = pd.DataFrame(z[:, :2], index=obs.index)
    return adata


def test_score_reads_adata(scored_adata):
    obs_before = scored_adata.obs.copy()
    s = metrics.score(scored_adata)
    z = scored_adata.obsm["X_pyro_scvi"]
    assert s == metrics.score_latent(
        z, scored_adata.obs["cell_type"].to_numpy(), scored_adata.obs["batch"].to_numpy()
    )
    pd.testing.assert_frame_equal(scored_adata.obs, obs_before)
    assert set(scored_adata.obsm) == {"X_pyro_scvi", "X_pca"}
    assert set(metrics.score(scored_adata, use_rep="X_pca", batch_key=None)) == {
        "ari",
        "nmi",
        "silhouette_label",
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_rep": "X_scVI"}, r"X_scVI.*adata\.obsm.*X_pyro_scvi"),
        ({"label_key": "celltype"}, r"celltype.*adata\.obs.*cell_type.*label_key=None"),
        ({"batch_key": "sample"}, r"sample.*adata\.obs.*batch_key=None"),
    ],
)
def test_score_missing_keys(scored_adata, kwargs, match):
    with pytest.raises(KeyError, match=match):
        metrics.score(scored_adata, **kwargs)
