"""Benchmarks of pyro_scvi: each study runs from the repository root as
``python -m benchmarks.<study>`` (see ``benchmarks/README.md``); :mod:`benchmarks.lib` holds
what they share."""
