"""Tests of pyro_scvi.datasets: real datasets (registry, download, offline), the simulator."""

import http.server
import inspect
import re
import shutil
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from pyro_scvi.datasets import pbmc8k_200hvg, synthetic_zinb

from pyro_scvi import datasets, from_anndata
from pyro_scvi.data.datasets import _convert


def test_pbmc8k_200hvg_loads_raw_counts():
    adata = pbmc8k_200hvg()
    assert adata.shape == (7448, 200)
    assert {"cell_type", "batch"} <= set(adata.obs.columns)
    assert adata.obs["cell_type"].notna().all() and adata.obs["batch"].notna().all()
    assert adata.obs["cell_type"].nunique() > 1
    values = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    assert (values >= 0).all()
    np.testing.assert_array_equal(values, np.round(values))
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    # Usable as is: the validation at the edge accepts it.
    data = from_anndata(adata, batch_key="batch")
    assert data.n_cells == 7448 and data.n_genes == 200


def test_path_of_shipped_dataset():
    p = datasets.path("pbmc8k_200hvg")
    assert p == datasets.path()
    assert p.is_file() and p.suffix == ".h5ad"
    assert p.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


@pytest.mark.parametrize("name", ["pbmc3k", "", "PBMC8K_200HVG"])
def test_path_unknown_name_raises_key_error(name):
    with pytest.raises(KeyError, match="pbmc8k_200hvg"):
        datasets.path(name)


def _sim(**kw):
    args = {"n_cells": 300, "n_genes": 30, "n_clusters": 3, "n_batches": 2, "seed": 0}
    return synthetic_zinb(**{**args, **kw})


def test_synthetic_zinb_is_reproducible_under_a_seed():
    a, b = _sim(seed=7, batch_effect=0.5), _sim(seed=7, batch_effect=0.5)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    pd.testing.assert_frame_equal(a.obs, b.obs)
    for key in ("log_fold_change", "batch_shift"):
        np.testing.assert_array_equal(a.uns["simulation"][key], b.uns["simulation"][key])


def test_synthetic_zinb_differs_across_seeds():
    a, b = _sim(seed=1), _sim(seed=2)
    assert (a.X.toarray() != b.X.toarray()).mean() > 0.3
    assert not a.obs["cell_type"].equals(b.obs["cell_type"])
    assert not np.array_equal(
        a.uns["simulation"]["log_fold_change"], b.uns["simulation"]["log_fold_change"]
    )


@pytest.mark.parametrize(
    ("n_cells", "n_genes", "n_clusters", "n_batches"),
    [(200, 30, 3, 1), (150, 17, 2, 3), (400, 40, 5, 2)],
)
def test_synthetic_zinb_shape_batches_clusters(n_cells, n_genes, n_clusters, n_batches):
    adata = synthetic_zinb(n_cells, n_genes, n_clusters=n_clusters, n_batches=n_batches, seed=3)
    assert adata.shape == (n_cells, n_genes)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert np.issubdtype(adata.X.dtype, np.integer)
    assert adata.X.data.min() >= 0
    assert sorted(adata.obs["batch"].unique()) == [f"batch{b}" for b in range(n_batches)]
    assert sorted(adata.obs["cell_type"].unique()) == sorted(f"type{k}" for k in range(n_clusters))
    sim = adata.uns["simulation"]
    assert sim["log_fold_change"].shape == (n_clusters, n_genes)
    assert sim["batch_shift"].shape == (n_batches, n_genes)
    assert not sim["batch_shift"].any()  # batch_effect=0 by default
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    # Every simulated cell has counts, so the data are valid model input as is.
    from_anndata(adata, batch_key="batch")


def test_synthetic_zinb_de_fraction():
    lfc = _sim(n_genes=40, de_fraction=0.25).uns["simulation"]["log_fold_change"]
    assert ((lfc != 0).sum(1) == 10).all()


def _log_cluster_means(adata):
    X = adata.X.toarray().astype(float)
    freq = X / X.sum(1, keepdims=True)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    k = adata.uns["simulation"]["log_fold_change"].shape[0]
    return np.log(np.stack([freq[types == f"type{c}"].mean(0) for c in range(k)]) + 1e-6)


def test_synthetic_zinb_cluster_structure_is_real():
    adata = synthetic_zinb(2000, 40, n_clusters=3, lfc_scale=1.5, gate_max=0.1, seed=0)
    lfc = adata.uns["simulation"]["log_fold_change"]
    de = (lfc != 0).any(0)
    assert 0 < de.sum() < len(de)
    means = _log_cluster_means(adata)
    spread = means.max(0) - means.min(0)
    # Genes with a fold change differ between clusters far more than genes without.
    assert np.median(spread[de]) > 4 * np.median(spread[~de])
    # And in the right direction: observed cluster contrasts track the true ones.
    observed = means - means.mean(0)
    true = lfc - lfc.mean(0)
    r = np.corrcoef(observed[:, de].ravel(), true[:, de].ravel())[0, 1]
    assert r > 0.8


def test_synthetic_zinb_batch_effect_shifts_expression():
    adata = synthetic_zinb(2000, 30, n_clusters=1, n_batches=2, batch_effect=1.0, seed=0)
    shift = adata.uns["simulation"]["batch_shift"]
    assert shift.shape == (2, 30) and shift.std() > 0.3
    X = adata.X.toarray().astype(float)
    freq = X / X.sum(1, keepdims=True)
    batch = adata.obs["batch"].astype(str).to_numpy()
    observed = np.log(freq[batch == "batch1"].mean(0) + 1e-6) - np.log(
        freq[batch == "batch0"].mean(0) + 1e-6
    )
    true = shift[1] - shift[0]
    assert np.corrcoef(observed, true)[0, 1] > 0.8


# --- Real datasets: the registry, the download path and the offline path -------------------

REPO = Path(__file__).resolve().parents[1]
#: The folder of the six shared .h5ad files beside the checkout (developers' machines, CI).
SHARED = REPO.parent / "shared" / "data"

#: A tiny dataset in the CellBench source format (sc_mixology's CSVs): Ensembl IDs x cells.
CELSEQ_COUNTS = pd.DataFrame(
    {"A1": [5, 0, 1, 2, 7, 9], "A2": [1, 1, 1, 1, 1, 1], "A3": [0, 3, 0, 4, 2, 0]},
    index=[
        "ENSG00000000003",  # TSPAN6
        "ENSG00000232995",  # RGS5 (an older ID): summed with the one below
        "ENSG00000143248",  # RGS5
        "ENSG00000000419",  # DPM1
        "ENSG99999999999",  # no symbol: dropped
        "ERCC-00002",  # a spike-in that Drop-seq lacks: dropped
    ],
)
DROPSEQ_COUNTS = pd.DataFrame(
    {"CELL_1": [2, 0, 6, 1, 3], "CELL_2": [8, 8, 8, 8, 8]},
    index=[
        "ENSG00000000419",
        "ENSG00000143248",
        "ENSG00000000003",
        "ENSG99999999999",
        "ENSG00000232995",
    ],
)
CELSEQ_META = pd.DataFrame(
    {
        "demuxlet_cls": ["SNG", "DBL", "SNG"],  # A2 is a doublet: dropped
        "outliers": ["FALSE", "FALSE", "FALSE"],
        "cell_line": ["H1975", "H2228", "HCC827"],
    },
    index=["A1", "A2", "A3"],
)
DROPSEQ_META = pd.DataFrame(
    {
        "demuxlet_cls": ["SNG", "SNG"],
        "outliers": ["FALSE", "TRUE"],  # CELL_2 is a QC outlier: dropped
        "cell_line": ["H2228", "H1975"],
    },
    index=["CELL_1", "CELL_2"],
)
TINY_FILES = {
    "sc_celseq2.count.csv.gz": CELSEQ_COUNTS,
    "sc_celseq2.metadata.csv.gz": CELSEQ_META,
    "sc_dropseq.count.csv.gz": DROPSEQ_COUNTS,
    "sc_dropseq.metadata.csv.gz": DROPSEQ_META,
}


def _tiny_expected() -> anndata.AnnData:
    """What the converter must make of the tiny CSVs, written out by hand."""
    # genes: the IDs both technologies have and that have a symbol, in sorted order:
    # ENSG...003 TSPAN6, ENSG...419 DPM1, then ENSG...143248 + ENSG...232995 -> RGS5
    counts = np.array([[5, 2, 1 + 0], [0, 4, 0 + 3], [6, 2, 0 + 3]], dtype=np.int32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["H1975", "HCC827", "H2228"]),
            "batch": pd.Categorical(["CEL-seq2", "CEL-seq2", "Drop-seq"]),
        },
        index=["CEL-seq2:A1", "CEL-seq2:A3", "Drop-seq:CELL_1"],
    )
    return anndata.AnnData(
        sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=["TSPAN6", "DPM1", "RGS5"])
    )


class _Server:
    """A real HTTP server on localhost, in a thread, serving ``folder``; it logs each GET."""

    def __init__(self, folder: Path):
        self.folder = folder
        gets = self.gets = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                gets.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path):
    (tmp_path / "www").mkdir()
    s = _Server(tmp_path / "www")
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty download cache, and no ``$PYRO_SCVI_DATA``."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(datasets.CACHE_ENV, str(folder))
    monkeypatch.delenv(datasets.DATA_ENV, raising=False)
    return folder


def _publish(frame, path):
    # gzip-compressed, as the name says; a gzip header holds the time of writing, so mtime 0
    # makes a file published again in another second the same bytes
    frame.to_csv(path, compression={"method": "gzip", "mtime": 0})


@pytest.fixture
def tiny(server, cache, monkeypatch):
    """A registered dataset, 'tiny', in CellBench's source format, published by ``server``."""
    folder = server.folder / "tiny"
    folder.mkdir()
    for name, frame in TINY_FILES.items():
        _publish(frame, folder / name)
    expected = _tiny_expected()
    entry = datasets.Dataset(
        name="tiny",
        filename="tiny_cellbench.h5ad",
        sha256="0" * 64,  # of a distributed .h5ad; there is none of this dataset
        content_sha256=datasets.content_sha256(expected),
        shape=expected.shape,
        obs_columns=("cell_type", "batch"),
        sources=tuple(
            datasets.Source(f"{server.url}/tiny/{name}", datasets.sha256(folder / name))
            for name in TINY_FILES
        ),
        convert=_convert.sc_mixology_csv,
        note="a tiny dataset in CellBench's source format",
    )
    monkeypatch.setitem(datasets.REGISTRY, "tiny", entry)
    return entry


def _assert_same(a: anndata.AnnData, b: anndata.AnnData):
    assert sp.issparse(a.X) and a.X.format == "csr" and a.X.dtype == np.int32
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    pd.testing.assert_index_equal(a.obs_names, b.obs_names)
    pd.testing.assert_index_equal(a.var_names, b.var_names)
    pd.testing.assert_frame_equal(a.obs, b.obs)


def test_download_checks_converts_and_caches(tiny, server, cache):
    adata = datasets.load("tiny")
    _assert_same(adata, _tiny_expected())
    assert adata.uns["source"] == tiny.note
    assert sorted(server.gets) == sorted(f"/tiny/{name}" for name in TINY_FILES)
    assert (cache / "tiny_cellbench.h5ad").is_file()
    assert sorted(p.name for p in (cache / "sources" / "tiny").iterdir()) == sorted(TINY_FILES)
    # A second call reads the cache: no request at all, and the same data.
    server.gets.clear()
    again = datasets.load("tiny")
    assert server.gets == []
    _assert_same(again, adata)
    assert datasets.fetch("tiny", download=False) == cache / "tiny_cellbench.h5ad"


def test_tampered_download_is_refused_and_nothing_kept(tiny, server, cache):
    count = server.folder / "tiny" / "sc_dropseq.count.csv.gz"
    tampered = DROPSEQ_COUNTS.copy()
    tampered.iloc[0, 0] += 1
    _publish(tampered, count)
    with pytest.raises(datasets.ChecksumError, match="Refused the download") as err:
        datasets.load("tiny")
    message = str(err.value)
    assert f"{server.url}/tiny/sc_dropseq.count.csv.gz" in message
    assert tiny.sources[2].sha256 in message and "Nothing was kept" in message
    assert not (cache / "tiny_cellbench.h5ad").exists()
    assert not (cache / "sources" / "tiny" / "sc_dropseq.count.csv.gz").exists()
    # The intact file published again: the download goes through.
    _publish(DROPSEQ_COUNTS, count)
    _assert_same(datasets.load("tiny"), _tiny_expected())


def test_unreachable_source_says_where_it_looked(tiny, server, cache, monkeypatch, tmp_path):
    (server.folder / "tiny" / "sc_celseq2.count.csv.gz").unlink()  # HTTP 404
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(datasets.DatasetUnavailableError) as err:
        datasets.load("tiny", data_dir=tmp_path / "mine")
    message = str(err.value)
    for part in ("tiny_cellbench.h5ad", "data_dir", "$PYRO_SCVI_DATA", "the cache", "404"):
        assert part in message
    assert not (cache / "tiny_cellbench.h5ad").exists()


def test_download_false_never_asks_the_network(tiny, server):
    with pytest.raises(datasets.DatasetUnavailableError, match="download=False"):
        datasets.load("tiny", download=False)
    assert server.gets == []


def test_local_copies_come_first_and_are_verified(tiny, server, cache, monkeypatch, tmp_path):
    made = datasets.fetch("tiny")
    digest = datasets.sha256(made)
    monkeypatch.setitem(datasets.REGISTRY, "tiny", replace(tiny, sha256=digest))
    env, mine = tmp_path / "env", tmp_path / "mine"
    for folder in (env, mine):
        folder.mkdir()
        shutil.copyfile(made, folder / made.name)
    monkeypatch.setenv(datasets.DATA_ENV, str(env))
    server.gets.clear()
    assert datasets.fetch("tiny", data_dir=mine) == mine / made.name
    assert datasets.fetch("tiny") == env / made.name
    assert server.gets == []
    # A local copy with other bytes is refused, with the way out in the message.
    (mine / made.name).write_bytes(made.read_bytes()[:-10])
    with pytest.raises(datasets.ChecksumError) as err:
        datasets.load("tiny", data_dir=mine)
    message = str(err.value)
    assert str(mine / made.name) in message and digest in message
    assert "Replace it with an intact copy, or remove it" in message


def test_damaged_cache_is_rebuilt_from_the_cached_sources(tiny, server, cache):
    path = datasets.fetch("tiny")
    path.write_bytes(b"not an h5ad file")
    server.gets.clear()
    _assert_same(datasets.load("tiny"), _tiny_expected())
    assert server.gets == []  # the verified sources were still in the cache


def test_a_conversion_that_differs_from_the_registry_is_refused(tiny, cache, monkeypatch):
    monkeypatch.setitem(datasets.REGISTRY, "tiny", replace(tiny, content_sha256="1" * 64))
    with pytest.raises(datasets.DatasetError, match="a library that reads the source"):
        datasets.load("tiny")
    assert not (cache / "tiny_cellbench.h5ad").exists()


def test_names_and_lookup_by_file_name():
    assert datasets.names() == [
        "pbmc8k_200hvg",
        "cellbench_3cl_2tech",
        "zeisel_cortex_subset",
        "baron_pancreas",
        "worm_neurons",
        "onek1k_pbmc_40donors",
    ]
    for d in datasets.REGISTRY.values():
        assert datasets.entry(d.filename) is datasets.entry(d.stem) is d
    with pytest.raises(KeyError, match="cellbench_3cl_2tech"):
        datasets.entry("pbmc3k")


@pytest.mark.parametrize("name", list(datasets.REGISTRY))
def test_registry_entry_and_loader_document_their_source(name):
    d = datasets.REGISTRY[name]
    assert d.filename.endswith(".h5ad") and len(d.sha256) == len(d.content_sha256) == 64
    assert d.obs_columns[:2] == ("cell_type", "batch")
    loader = getattr(datasets, name)
    doc = loader.__doc__
    for s in d.sources:
        assert s.url.startswith("https://raw.githubusercontent.com/") and len(s.sha256) == 64
        repository, commit = s.url.split("/")[3:5], s.url.split("/")[5]
        assert len(commit) == 40  # a pinned commit, not a branch
        assert "/".join(repository) in doc and commit[:8] in doc
    for part in ("Licence", "References", "data_dir", f"{d.shape[0]:,}", f"{d.shape[1]:,}"):
        assert part in doc
    assert inspect.signature(loader).parameters["data_dir"].kind is inspect.Parameter.KEYWORD_ONLY


def test_shipped_pbmc_needs_no_network(cache):
    adata = datasets.pbmc8k_200hvg(download=False)
    assert datasets.content_sha256(adata) == datasets.REGISTRY["pbmc8k_200hvg"].content_sha256
    assert datasets.fetch("pbmc8k_200hvg") == datasets.path("pbmc8k_200hvg")


needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"no shared data folder beside the checkout ({SHARED})"
)


@needs_shared
@pytest.mark.parametrize("name", list(datasets.REGISTRY))
def test_offline_every_dataset_from_the_shared_folder(name, cache):
    d = datasets.REGISTRY[name]
    if not (SHARED / d.filename).is_file():
        pytest.skip(f"{d.filename} is not in {SHARED}")
    assert datasets.fetch(name, data_dir=SHARED, download=False) == SHARED / d.filename
    adata = getattr(datasets, name)(data_dir=SHARED, download=False)
    assert adata.shape == d.shape
    assert tuple(adata.obs.columns) == d.obs_columns
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.int32
    assert adata.X.data.min() >= 0
    for column in d.obs_columns:
        assert isinstance(adata.obs[column].dtype, pd.CategoricalDtype)
        assert adata.obs[column].notna().all()
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert adata.uns["source"] == d.note
    assert datasets.content_sha256(adata) == d.content_sha256
    assert not cache.exists()  # nothing downloaded, nothing cached


@needs_shared
def test_offline_through_the_environment_variable(monkeypatch, cache):
    monkeypatch.setenv(datasets.DATA_ENV, str(SHARED))
    adata = datasets.zeisel_cortex_subset(download=False)
    assert adata.shape == datasets.REGISTRY["zeisel_cortex_subset"].shape


@needs_shared
def test_fetch_all_gathers_every_dataset_in_the_cache(monkeypatch, cache):
    if not all((SHARED / d.filename).is_file() for d in datasets.REGISTRY.values()):
        pytest.skip(f"not every dataset is in {SHARED}")
    monkeypatch.setenv(datasets.DATA_ENV, str(SHARED))
    assert datasets.fetch_all(download=False) == cache
    for d in datasets.REGISTRY.values():
        assert datasets.sha256(cache / d.filename) == d.sha256
    monkeypatch.delenv(datasets.DATA_ENV)
    cached = cache / "cellbench_3cl_2tech.h5ad"
    assert datasets.fetch("cellbench_3cl_2tech", download=False) == cached


#: An absolute path of one machine, not inside a URL or a relative path: under work, home,
#: root or a scratch folder of Linux (tmp, var/tmp), macOS (var/folders, private, Users)
#: or Windows (a drive's Users or Windows). The character classes keep these lines from
#: matching themselves.
MACHINE_PATH = re.compile(
    r"(?<![\w.~/\\-])(?:/(?:(?:work|home|tm[p]|va[r]/(?:tmp|folders)|privat[e]|User[s])/|root\b)"
    r"|[A-Za-z]:[\\/]+(?:User[s]|Window[s])\b)"
)
#: The developers' and CI's data folder beside the checkout: a user's clone has none. Tests
#: may look for it there (and skip without it); the package, docs, notebooks and benchmarks
#: reach the data through pyro_scvi.datasets and $PYRO_SCVI_DATA instead.
SHARED_SIBLING = re.compile(r"\.\./share[d]\b")


def machine_paths(name: str, line: str) -> bool:
    """Whether ``line`` of the tracked file ``name`` names a folder of one machine."""
    return bool(MACHINE_PATH.search(line)) or (
        not name.startswith("tests/") and bool(SHARED_SIBLING.search(line))
    )


def _tracked_text_files():
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout, or no git: {err}")
    for name in out.decode().split("\0"):
        if not name:
            continue
        data = (REPO / name).read_bytes() if (REPO / name).is_file() else b""
        if b"\0" not in data[:8192]:
            yield name, data.decode("utf-8", errors="replace")


def test_no_absolute_path_of_this_machine_in_the_repository():
    files = dict(_tracked_text_files())
    assert {"pyproject.toml", "pyro_scvi/data/datasets/_registry.py"} <= set(files)
    found = [
        f"{name}:{number}: {line.strip()[:120]}"
        for name, text in files.items()
        for number, line in enumerate(text.splitlines(), 1)
        if machine_paths(name, line)
    ]
    assert not found, "absolute paths of one machine; use relative paths or $PYRO_SCVI_DATA:\n" + (
        "\n".join(found)
    )


@pytest.mark.parametrize(
    ("name", "line", "flagged"),
    [  # "@" stands for "/" and "%" for a backslash, so that this file holds no such path itself
        ("README.md", 'DATA = "@work/shared/data"', True),
        ("README.md", "--out-dir @tmp/reads", True),
        ("README.md", "cd @root", True),
        ("README.md", "@home/user/x.h5ad", True),
        ("README.md", "PYTHONPATH=$PWD:@tmp/site", True),
        ("README.md", "--out-dir @var@folders@x1@abc123@T@reads", True),  # macOS
        ("README.md", '"@private@var@folders@x1@abc123@T"', True),
        ("README.md", "@var@tmp@runs", True),
        ("README.md", "cd @Users@me@data", True),
        ("README.md", "C:%Users%me%AppData%Local%Temp%reads", True),  # Windows
        ("README.md", '"D:%%Windows%%Temp"', True),  # as JSON writes it
        ("README.md", "C:@Users@me", True),
        ("docs/x.md", "--data-dir ..@shared/data", True),
        ("benchmarks/README.md", "PYRO_SCVI_DATA=$PWD/..@shared/data", True),
        ("tests/conftest.py", "..@shared/data", False),
        ("README.md", "https://example.org@home/index.html", False),
        ("README.md", "~/.cache/pyro_scvi", False),
        ("README.md", "/scratch/", False),
        ("README.md", "https://example.org@Users@index.html", False),
        ("README.md", "@usr@share@doc", False),
        ("README.md", 'reads=$(mktemp -d); --out-dir "$reads"', False),
    ],
)
def test_machine_path_pattern(name, line, flagged):
    assert machine_paths(name, line.replace("@", "/").replace("%", "\\")) is flagged
