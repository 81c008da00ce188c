"""Sphinx configuration of the pyro_scvi documentation.

Build: ``python -m sphinx -W --keep-going -n -b html docs docs/_build/html`` from the
repository root (``tests/test_docs.py`` runs exactly this into a temporary folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the checkout's package, not another installed copy
sys.path.insert(0, str(DOCS / "_ext"))

import pyro_scvi  # noqa: E402

project = "pyro_scvi"
author = "pyro_scvi developers"
copyright = "the pyro_scvi developers"  # noqa: A001
release = pyro_scvi.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_nb",
    "sphinx_copybutton",
    "apigen",  # docs/_ext/apigen.py: the API reference, generated from the package
    "benchpages",  # docs/_ext/benchpages.py: one page per benchmarks/results/ table
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "tutorials/notebooks/figures"]

# --- notebooks: shown with their committed outputs, never executed here ----------------
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# --- API reference -------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

numpydoc_show_class_members = False  # autodoc's :members: lists them
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# --- references ----------------------------------------------------------------------
# Nitpicky mode (-n): every cross-reference must resolve. This machine (and CI) has no
# internet, so intersphinx cannot fetch the inventories of the libraries we build on.
# References *into those libraries* (type hints such as ``torch.Tensor`` or
# ``anndata.AnnData``, base classes such as ``torch.nn.Module``) are therefore not checked;
# the patterns below match third-party and standard-library module prefixes only, never a
# ``pyro_scvi`` name, so a broken reference into the package still fails the build. The
# short names are the package's import aliases (``import numpy as np``). A string annotation
# that names what a module imported (``AnnData``, ``nn.Module``, often under TYPE_CHECKING)
# is looked up in that module's imports by ``_ext/apigen.py`` and passes only when it leads
# to one of these prefixes; a name imported from the package itself (``OutputError`` in
# ``pyro_scvi.io.files``) is linked to that object's documentation, or reported if it has none.
_EXTERNAL = (
    "torch",
    "pyro",
    "anndata",
    "numpy",
    "np",
    "pandas",
    "pd",
    "scipy",
    "sp",
    "arviz",
    "az",
    "sklearn",
    "matplotlib",
    "h5py",
    "tqdm",
    # the standard library's names in the package's signatures (no inventory offline either)
    "argparse",
    "collections",
    "contextlib",
    "os",
    "pathlib",
)
nitpick_ignore_regex = [(r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..+)?")]

# --- HTML ----------------------------------------------------------------------------
html_theme = "furo"
html_title = f"pyro_scvi {release}"
html_static_path: list[str] = []

# copying an example from a docstring leaves its prompts behind
copybutton_prompt_text = r">>> |\.\.\. "
copybutton_prompt_is_regexp = True
