"""What the studies share.

- :mod:`.data`: datasets (the shared ones through :mod:`pyro_scvi.datasets`, simulated ones,
  files in a folder), the train/held-out split, a dataset prepared for worker processes;
- :mod:`.adapters`: one adapter per implementation (pyro_scvi, scvi-tools, the PyTorch
  floor), each fitting and scoring through the same interface;
- :mod:`.score`: latent-space scores, imputation, DE helpers;
- :mod:`.results`: the header of every results file (date, command, machine, versions,
  commit), markdown tables and atomic writes;
- :mod:`.workers`: runs in processes of their own, memory readings, medians over runs.

Nothing here imports a numerical library at import time: a study's parent process stays
small, so that its workers' peak memory is their own.
"""
