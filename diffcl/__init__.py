"""diffcl: the model library (graphs, models, training, evaluation) and the shared config.

It knows nothing of Prefect: ``flows/`` orchestrates it, ``features/`` feeds it.
"""

__version__ = "0.1.0"
