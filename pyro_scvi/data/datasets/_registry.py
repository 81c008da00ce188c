"""The registry of real datasets, and how a dataset is found, downloaded, verified and cached.

A dataset's ``.h5ad`` is looked for, in this order, in

1. the ``data_dir`` argument of its loader;
2. the folder named by the environment variable ``PYRO_SCVI_DATA``;
3. the package itself (only the datasets that ship with it);
4. the user cache: ``PYRO_SCVI_CACHE`` where set, else ``pooch.os_cache("pyro_scvi")``
   (``~/.cache/pyro_scvi`` on Linux).

A copy found in 1-3 must have the SHA-256 that the registry records, or it is refused with
:class:`ChecksumError`. Where there is none, the dataset's original files are downloaded
from their public source (a pinned commit of a GitHub repository) by :mod:`pooch`, each
checked against its own SHA-256, converted to the package's AnnData contract, checked
against the registry's content digest (:func:`content_sha256`), and written into the cache.
The source files stay in ``<cache>/sources/<dataset>/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from urllib.parse import unquote

import anndata
import numpy as np
import scipy.sparse as sp

from ...errors import ChecksumError, DatasetError, DatasetUnavailableError
from . import _convert

#: Environment variable naming a folder of the datasets' ``.h5ad`` files.
DATA_ENV = "PYRO_SCVI_DATA"
#: Environment variable naming the download cache (default: ``pooch.os_cache("pyro_scvi")``).
CACHE_ENV = "PYRO_SCVI_CACHE"


@dataclass(frozen=True)
class Source:
    """One original file of a dataset: where it is published, and its SHA-256."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        """The file's name, from its URL."""
        return unquote(self.url.rsplit("/", 1)[-1])


@dataclass(frozen=True)
class Dataset:
    """A registered dataset.

    ``filename`` is its ``.h5ad`` in a data folder and ``sha256`` that file's SHA-256;
    ``content_sha256`` is :func:`content_sha256` of its contents (what a conversion must
    reproduce, whatever the anndata version that writes the file). ``convert`` turns the
    ``sources`` (downloaded, in order) into the contract; ``note`` becomes
    ``uns["source"]``. ``shipped``: the file is inside the package.
    """

    name: str
    filename: str
    sha256: str
    content_sha256: str
    shape: tuple[int, int]
    obs_columns: tuple[str, ...]
    sources: tuple[Source, ...]
    convert: Callable[[Sequence[Path]], anndata.AnnData]
    note: str
    shipped: bool = False

    @property
    def stem(self) -> str:
        """The file name without ``.h5ad``."""
        return self.filename.removesuffix(".h5ad")


def _raw(repository: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repository}/{commit}/{path.replace(' ', '%20')}"


_MIXOLOGY = ("LuyiTian/sc_mixology", "19667e111aac52abbfcaa6fff07da2fd05984709")

#: Every real dataset, by name.
REGISTRY: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            name="pbmc8k_200hvg",
            filename="pbmc8k_200hvg.h5ad",
            sha256="55c07da17cd2f60e20d900c790b9254fdeb695e0eec0d967508598e1245a9639",
            content_sha256="b7ba587eec48deb066d1c11f412e372632c80003d3242fcd1810a047c6778d24",
            shape=(7448, 200),
            obs_columns=("cell_type", "batch"),
            sources=(
                Source(
                    _raw(
                        "maren-ha/scVI.jl",
                        "28963f7ba61cfa0e9532b36d09e623b55d0b9b85",
                        "data/pbmc.h5ad",
                    ),
                    "828407d4a3a3091e7420888f5d591afef5df59c61d7d83416116bfc84811d0ac",
                ),
            ),
            convert=_convert.scvi_jl_h5ad,
            note=(
                "Zheng et al. 2017 PBMC8k (10x Genomics), 200 HVGs, as shipped in maren-ha/scVI.jl"
            ),
            shipped=True,
        ),
        Dataset(
            name="cellbench_3cl_2tech",
            filename="cellbench_3cl_2tech.h5ad",
            sha256="7af7e3662f34f767d4617dddb43f5826b445fd9c36c98fb5e9f86d75d9ba7a36",
            content_sha256="e681f8511d1d9ba11c113c88ff40825cc1d0745820c6441c8215b170fac5d118",
            shape=(450, 13033),
            obs_columns=("cell_type", "batch"),
            sources=(
                Source(
                    _raw(*_MIXOLOGY, "data/csv/sc_celseq2.count.csv.gz"),
                    "a82aa89b8995aed412f4260c0adb343967e33a801af6f2e0aa647c1d897a5a21",
                ),
                Source(
                    _raw(*_MIXOLOGY, "data/csv/sc_celseq2.metadata.csv.gz"),
                    "78429916bac394d92d8c972059a8f195c5479ce578da04f1eb3ba599585ef3d9",
                ),
                Source(
                    _raw(*_MIXOLOGY, "data/csv/sc_dropseq.count.csv.gz"),
                    "98c0bb6a9fbf4b93967ef82cef9985d7691cf59a31dc5b0b3699f70ed1a0fd08",
                ),
                Source(
                    _raw(*_MIXOLOGY, "data/csv/sc_dropseq.metadata.csv.gz"),
                    "4c48f3e13778e89192d9861095bc102cc0deb9eba1a7f47a093f5a058ce1aa6a",
                ),
            ),
            convert=_convert.sc_mixology_csv,
            note=(
                "Tian et al. 2019 Nat Methods (CellBench / sc_mixology), 3 lung adenocarcinoma "
                "cell lines, CEL-seq2 + Drop-seq; demuxlet singlets only"
            ),
        ),
        Dataset(
            name="zeisel_cortex_subset",
            filename="zeisel_cortex_subset_1464x1000.h5ad",
            sha256="30b10bd22a1845da07af5c1b284ed44dc26c3cf4660f43078387ec7b154125c1",
            content_sha256="fdbcf8ae6c36c87a4535dcac1d8ae1a13cf0122972d556878929d0160516a557",
            shape=(1464, 1000),
            obs_columns=("cell_type", "batch"),
            sources=(
                Source(
                    _raw(
                        "jingshuw/descend",
                        "18afd4cf1d9ac56d2256ab63a95e358b415c7341",
                        "data/zeisel.rda",
                    ),
                    "4cc4dd026441575a6dc0ec68b8911e4c7c8bef2dd36fad04e50930d831e3a80b",
                ),
            ),
            convert=_convert.descend_rda,
            note=(
                "Zeisel et al. 2015 (GSE60361) subset as shipped in jingshuw/descend "
                "data/zeisel.rda (count.matrix.large)"
            ),
        ),
        Dataset(
            name="baron_pancreas",
            filename="baron_pancreas_indrop_neuca.h5ad",
            sha256="446b119be97ff9f9778ee76b8f26a5a9d2643efb555af82b4a0f54cd9bd32848",
            content_sha256="4626c05faf1c52724f04fa93d087b45942cc4a00202c36016eafe72ac1e9915a",
            shape=(2812, 2000),
            obs_columns=("cell_type", "batch", "library"),
            sources=(
                Source(
                    _raw(
                        "haoharryfeng/NeuCA",
                        "239179ab11b653164a599b3187e428799c74ce69",
                        "data/Baron_scRNA.RData",
                    ),
                    "89bfda1ced44a32701c5e675d808e8ae2178dc461bdc068f6d89c02a09e8076a",
                ),
            ),
            convert=_convert.neuca_rdata,
            note=(
                "github.com/haoharryfeng/NeuCA data/Baron_scRNA.RData (commit "
                "239179ab11b653164a599b3187e428799c74ce69; objects Baron_counts, "
                "Baron_true_cell_label); subset of Baron et al. 2016 Cell Systems 3:346 (GEO "
                "GSE84133), human pancreas inDrop UMI counts, 2000 genes selected by NeuCA "
                "authors; batch=donor parsed from cell name, library=cell-name prefix; NeuCA "
                "DESCRIPTION License: GPL-2 (no separate data license stated)"
            ),
        ),
        Dataset(
            name="worm_neurons",
            filename="worm_neuron_scirnaseq_scdeepcluster.h5ad",
            sha256="aeed93da311175e4c3d2475ef76703b2319967d26ea54528973b24f562f9b1cb",
            content_sha256="3c4c0d8537e9de56afe7b46222ecfe4ad60a3ea4a9fc13d02a363b9fdff5ae5b",
            shape=(4186, 13488),
            obs_columns=("cell_type", "batch"),
            sources=(
                Source(
                    _raw(
                        "ttgump/scDeepCluster",
                        "ae033d7e366e68e68fe8ac5792744aa19cbc20f9",
                        "scRNA-seq data/worm_neuron_cell.h5",
                    ),
                    "4f2a3c4b8492bcd11d957a8a74098ba258c271d714718c175854a7c44b1e31e6",
                ),
            ),
            convert=_convert.scdeepcluster_h5,
            note=(
                'github.com/ttgump/scDeepCluster "scRNA-seq data/worm_neuron_cell.h5" (added in '
                "commit ae033d7e366e68e68fe8ac5792744aa19cbc20f9, later removed from HEAD; "
                "datasets X counts, Y integer labels; no gene/cell names or label names in "
                "file); C. elegans neurons, sci-RNA-seq, Cao et al. 2017 Science 357:661, as "
                "preprocessed for Tian et al. 2019 Nat Mach Intell (scDeepCluster); repo "
                "LICENSE.md: Apache-2.0 (no separate data license stated)"
            ),
        ),
        Dataset(
            name="onek1k_pbmc_40donors",
            filename="onek1k_pbmc_40donors_scdesignpop.h5ad",
            sha256="b7a4079e8a55fcca76d93f32c128d388cd7fae9c916a06a6ea9dc165648716b3",
            content_sha256="97ccad23fa5df1c2c68536e63a33fc9cfe8cfa054962ea3b35246ef11028b5b3",
            shape=(7811, 1000),
            obs_columns=("cell_type", "batch", "sex", "age"),
            sources=(
                Source(
                    _raw(
                        "chrisycd/scDesignPop",
                        "2622d1d68fbedfd2fe9221a1796c7980f0a83a19",
                        "data/example_sce.rda",
                    ),
                    "36f0d47be65fda1b79c0faa6f6120bd8ae54f9261ae6807dd80f958edefe9101",
                ),
            ),
            convert=_convert.scdesignpop_rda,
            note=(
                "github.com/chrisycd/scDesignPop data/example_sce.rda (git blob "
                "54d36dabaa76fc01039d5fd095215ddaaf2c4a1e, introduced in commit "
                '2622d1d68fbedfd2fe9221a1796c7980f0a83a19 "Update example data" 2025-12-10, '
                "unchanged at HEAD e05f1f9c873d413d70efd12d065e6cc53eded081; object "
                "example_sce, SingleCellExperiment, assay counts; colData indiv, cell_type, "
                "sex, age); subset of OneK1K, Yazar et al. 2022 Science 376:eabf3041, human "
                "PBMC 10x Genomics UMI counts, 1000 genes (Ensembl IDs; rowData empty, no "
                "symbols) x 4 cell types (OneK1K labels: cd4nc CD4 naive/central memory T, "
                "bmem memory B, monoc classical monocytes, mononc non-classical monocytes) x "
                "40 individuals anonymized by scDesignPop as SAMP1..SAMP40; batch=indiv; sex "
                "(coded 1/2, coding undocumented) and age copied from colData; scDesignPop "
                "DESCRIPTION License: MIT + file LICENSE (no separate data license stated)"
            ),
        ),
    )
}


def names() -> list[str]:
    """The registered datasets' names.

    Examples
    --------
    >>> "cellbench_3cl_2tech" in names()
    True
    """
    return list(REGISTRY)


def entry(name: str) -> Dataset:
    """A registered dataset, by its name or its file's name (with or without ``.h5ad``).

    Examples
    --------
    >>> entry("zeisel_cortex_subset_1464x1000").name
    'zeisel_cortex_subset'
    """
    if name in REGISTRY:
        return REGISTRY[name]
    for d in REGISTRY.values():
        if name in (d.filename, d.stem):
            return d
    raise KeyError(f"No dataset {name!r}; available: {', '.join(REGISTRY)}.")


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(adata: anndata.AnnData) -> str:
    """A SHA-256 of what the contract holds, independent of how the file was written.

    It covers the counts (as CSR, int64, little-endian), ``obs_names``, ``var_names`` and
    every ``obs`` column (name and values as strings), in order. Two AnnData with the same
    digest hold the same counts, names and labels.

    Examples
    --------
    >>> a = _convert.contract(np.eye(2), ["c1", "c2"], ["g1", "g2"], {"batch": ["b", "b"]})
    >>> b = a.copy()
    >>> b.X = b.X.toarray()
    >>> content_sha256(a) == content_sha256(b)
    True
    """
    X = sp.csr_matrix(adata.X, dtype=np.int64, copy=True)
    X.sum_duplicates()
    X.eliminate_zeros()
    X.sort_indices()
    digest = hashlib.sha256()
    for part in (np.asarray(X.shape), X.indptr, X.indices, X.data):
        digest.update(np.ascontiguousarray(part, dtype="<i8").tobytes())
    texts = [adata.obs_names, adata.var_names]
    for key in adata.obs.columns:
        texts += [[str(key)], adata.obs[key].astype(str)]
    for text in texts:
        digest.update("\n".join(map(str, text)).encode() + b"\0")
    return digest.hexdigest()


def cache_dir() -> Path:
    """The download cache: ``$PYRO_SCVI_CACHE``, else ``pooch.os_cache("pyro_scvi")``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import pooch

    return Path(pooch.os_cache("pyro_scvi"))


def _folders(d: Dataset, data_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """``(what, folder)`` searched for a local copy, in order, the cache excluded."""
    found = []
    if data_dir is not None:
        found.append(("data_dir", Path(data_dir).expanduser()))
    if os.environ.get(DATA_ENV):
        found.append((f"${DATA_ENV}", Path(os.environ[DATA_ENV]).expanduser()))
    if d.shipped:
        found.append(("the package", Path(str(files(__package__)))))
    return found


def verify(d: Dataset, path: Path) -> Path:
    """``path`` when its SHA-256 is the registry's; :class:`ChecksumError` otherwise."""
    got = sha256(path)
    if got != d.sha256:
        raise ChecksumError(
            f"{path} is not the {d.name!r} dataset that this version of pyro_scvi knows: "
            f"its SHA-256 is {got}, the registry's is {d.sha256}. It is damaged or another "
            f"version of {d.filename}. Replace it with an intact copy, or remove it (or point "
            f"data_dir / ${DATA_ENV} elsewhere) to have the dataset downloaded from its "
            f"source ({d.sources[0].url}) and converted."
        )
    return path


def _cached_copy(d: Dataset) -> Path | None:
    """The cache's converted copy when it holds the registered dataset, else ``None``."""
    path = cache_dir() / d.filename
    if not path.is_file():
        return None
    if sha256(path) == d.sha256:
        return path
    try:  # written by another anndata version: the same content, other bytes
        same = content_sha256(anndata.read_h5ad(path)) == d.content_sha256
    except Exception:  # a damaged file: h5py and anndata raise many types
        same = False
    return path if same else None


def _download(d: Dataset, searched: list[str]) -> list[Path]:
    """The dataset's source files, downloaded into the cache (or found there) and verified."""
    import pooch

    folder = cache_dir() / "sources" / d.name
    paths = []
    for s in d.sources:
        try:
            got = pooch.retrieve(
                s.url, known_hash=f"sha256:{s.sha256}", fname=s.filename, path=folder
            )
        except ValueError as err:
            if "hash" not in str(err):
                raise
            raise ChecksumError(
                f"Refused the download of {s.url} for dataset {d.name!r}: its SHA-256 is not "
                f"the registered {s.sha256} ({err}). Nothing was kept. The file at the source "
                f"changed or the transfer was damaged: try again; if it persists, put a copy "
                f"of {d.filename} in a folder given as data_dir or ${DATA_ENV}."
            ) from err
        except OSError as err:  # requests' errors are OSErrors: offline, HTTP 404, ...
            raise DatasetUnavailableError(
                f"Dataset {d.name!r} ({d.filename}) is in none of {', '.join(searched)}, and "
                f"downloading {s.url} failed ({type(err).__name__}: {err}). Put "
                f"{d.filename} in a folder and pass it as data_dir or set ${DATA_ENV} to it, "
                f"or retry where that URL can be reached."
            ) from err
        paths.append(Path(got))
    return paths


def _convert_into_cache(d: Dataset, sources: list[Path]) -> Path:
    """Convert the sources, check the result against the registry, write it into the cache."""
    adata = d.convert(sources)
    adata.uns["source"] = d.note
    got = content_sha256(adata)
    if (
        adata.shape != d.shape
        or tuple(adata.obs.columns) != d.obs_columns
        or (got != d.content_sha256)
    ):
        raise DatasetError(
            f"Converting the sources of {d.name!r} gave {adata.shape[0]} x {adata.shape[1]} "
            f"with obs {list(adata.obs.columns)} and content SHA-256 {got}, not the "
            f"registered {d.shape[0]} x {d.shape[1]}, {list(d.obs_columns)}, "
            f"{d.content_sha256}: a library that reads the source behaves differently. "
            f"Put {d.filename} in a folder given as data_dir or ${DATA_ENV} instead."
        )
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{d.filename}.", suffix=".h5ad", dir=folder)
    os.close(fd)
    try:
        adata.write_h5ad(tmp, compression="gzip")
        os.replace(tmp, folder / d.filename)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return folder / d.filename


def fetch(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The path of a dataset's verified ``.h5ad``, downloaded and converted if need be.

    Parameters
    ----------
    name
        The dataset's name (:func:`names`) or its file's name.
    data_dir
        A folder searched first; then ``$PYRO_SCVI_DATA``, the package (shipped datasets)
        and the cache (see the module's documentation).
    download
        Where no local copy exists: ``True`` downloads, verifies and converts the
        dataset's sources into the cache; ``False`` raises
        :class:`DatasetUnavailableError`.

    Raises
    ------
    ChecksumError
        A local copy or a downloaded source file has another SHA-256 than registered.
    DatasetUnavailableError
        No local copy, and no download (``download=False``, offline, or the source gone).
    """
    d = entry(name)
    searched = []
    for what, folder in _folders(d, data_dir):
        path = folder / d.filename
        if path.is_file():
            return verify(d, path)
        searched.append(f"{what} ({folder})")
    cached = _cached_copy(d)
    if cached is not None:
        return cached
    searched.append(f"the cache ({cache_dir()})")
    if not download:
        raise DatasetUnavailableError(
            f"Dataset {d.name!r} ({d.filename}) is in none of {', '.join(searched)}, and "
            f"download=False. Allow the download, or put {d.filename} in a folder and pass "
            f"it as data_dir or set ${DATA_ENV} to it."
        )
    return _convert_into_cache(d, _download(d, searched))


def fetch_all(*, download: bool = True) -> Path:
    """The cache folder, holding every registered dataset's ``.h5ad`` (copied or downloaded).

    For tools that read a folder of ``.h5ad`` files (the benchmarks). A dataset found in
    ``$PYRO_SCVI_DATA`` or the package is copied into the cache; others are downloaded.
    """
    folder = cache_dir()
    for name in REGISTRY:
        path = fetch(name, download=download)
        if path.parent.resolve() != folder.resolve():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / path.name)
    return folder


def load(
    name: str, *, data_dir: str | os.PathLike | None = None, download: bool = True
) -> anndata.AnnData:
    """A registered dataset as an AnnData of the contract (see :func:`fetch`).

    Examples
    --------
    >>> load("pbmc8k_200hvg").shape  # shipped: no download
    (7448, 200)
    """
    return anndata.read_h5ad(fetch(name, data_dir=data_dir, download=download))
