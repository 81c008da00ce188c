"""What the studies share (datasets, adapters, scores, results files, worker processes).

Nothing here imports a numerical library at import time: a study's parent process stays
small, so that its workers' peak memory is their own.
"""
