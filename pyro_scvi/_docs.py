"""Parameter descriptions that several docstrings share, written once.

A docstring names a shared parameter by a line that holds only ``{name}``;
:func:`fill_doc` puts the description of :data:`PARAMETERS` in its place, indented as the
placeholder is. The filled docstring is ordinary numpydoc, so help(), Sphinx and doctest
read it as if it had been written out.
"""

from __future__ import annotations

import re
from typing import TypeVar

T = TypeVar("T")

#: name -> the parameter's numpydoc entry (its name line, then its description)
PARAMETERS: dict[str, str] = {
    "fitted": """fitted
    A fitted model: an :class:`~pyro_scvi.SCVI` (whose method of the same name is this
    function) or any :class:`~pyro_scvi.posterior.fitted.Fitted`.""",
    "adata": """adata
    Cells to query (default: the AnnData the model was set up on): the model's genes, in
    order, and only batches it knows.""",
    "indices": """indices
    Positions (or a boolean mask) of the cells of ``adata`` to query, in this order
    (default: all). Unlike a view of ``adata`` they read the cells where the counts are:
    a streamed model's from its file, a minibatch at a time.""",
    "batch_size": """batch_size
    Cells per pass; memory grows as ``batch_size x n_samples x genes``.""",
    "seed": """seed
    Seed for the draws; the global random state is left as it was.""",
    "transform_batch": """transform_batch
    Batch name (or names, whose decoded expression is averaged) to decode every cell
    under: batch-corrected expression. ``None`` decodes each cell in its own batch.""",
    "gene_list": """gene_list
    Genes to return (default: all), in the order given.""",
    "per_cell": """per_cell
    Return one value per cell instead of the mean over cells.""",
    "fit_samples": """n_samples, batch_size, seed
    As in :func:`get_fit_statistics`.""",
    "observed_library": """observed_library
    Condition on each cell's observed library ``l = log sum_g x_g`` instead of
    integrating over the latent ``l``: ``marginal_ll`` then estimates ``log p(x | l)``,
    the quantity a model with an observed library (scvi-tools' default) reports, so the
    two compare like for like. A model that observes its library
    (:class:`~pyro_scvi.model.priors.ObservedLibrary`) gives the same numbers either
    way.""",
    "streamed": """streamed
    For a backed AnnData (``anndata.read_h5ad(path, backed="r")``): read the counts from
    the file as training goes (:class:`~pyro_scvi.data.StreamedCounts`) instead of
    loading them; ``None`` lets the engine decide from their size and the free memory
    (:func:`pyro_scvi.data.placement.choose_data_source`).""",
    "device": """device
    ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.""",
    "progress_bar": """progress_bar
    Show a progress bar.""",
    "dir_path": """dir_path
    The model folder (see :mod:`pyro_scvi.io`). It is checked first
    (:func:`pyro_scvi.io.read_model_dir`): a missing, damaged, foreign or newer-format
    model raises :class:`pyro_scvi.io.ModelFileError` (an ``InputError``); folders of an
    older format are migrated. Its files are read with ``weights_only=True``: nothing in
    them runs (:mod:`pyro_scvi.io.pickling`).""",
    "trust": """trust
    Allow full unpickling of a folder that needs classes or functions beyond pyro_scvi's
    own components (e.g. a prior class of your own module, or an edited file), with a
    warning. Its pickle can then run any code: pass it only for a folder you trust (you or
    a colleague wrote it). Without it such a folder raises
    :class:`~pyro_scvi.ModelFileError` and nothing of it runs; the command line's flag is
    ``--trust-model``.""",
}

_PLACEHOLDER = re.compile(r"^( *)\{(\w+)\}$", re.MULTILINE)


def fill(doc: str, parameters: dict[str, str] | None = None) -> str:
    r"""``doc`` with every line ``{name}`` replaced by the entry ``parameters[name]``.

    Parameters
    ----------
    doc
        A docstring.
    parameters
        Entries by name (default: :data:`PARAMETERS`).

    Returns
    -------
    str
        The docstring; a placeholder of no known entry raises ``KeyError`` (a typo).

    Examples
    --------
    >>> fill("Draw one.\n\n    {seed}", {"seed": "seed\n    The seed."}).splitlines()
    ['Draw one.', '', '    seed', '        The seed.']
    """
    table = PARAMETERS if parameters is None else parameters

    def entry(match: re.Match) -> str:
        indent, name = match.groups()
        return "\n".join(indent + line if line else line for line in table[name].splitlines())

    return _PLACEHOLDER.sub(entry, doc)


def fill_doc(obj: T) -> T:
    """Decorator: fill the placeholders of ``obj``'s docstring (:func:`fill`); return ``obj``.

    Examples
    --------
    >>> @fill_doc
    ... def draw(seed=None):
    ...     '''One draw.
    ...
    ...     Parameters
    ...     ----------
    ...     {seed}
    ...     '''
    >>> "the global random state" in draw.__doc__
    True
    """
    if obj.__doc__:
        obj.__doc__ = fill(obj.__doc__)
    return obj
