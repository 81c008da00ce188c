"""The package version, in a module that imports nothing (every layer may read it).

The one place the version is written: ``pyproject.toml`` reads it (setuptools' dynamic
version), and so do :data:`pyro_scvi.__version__` and the documentation.
"""

__version__ = "0.2.0"

#: The release that removes what this one deprecates: the flat import paths
#: (``pyro_scvi._moved``) and the command line's replaced spellings (``pyro_scvi.cli``).
REMOVED_IN = "0.3"
