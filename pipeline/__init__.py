"""The pipeline's stages as plain functions of a config: prepare, embed, graphs, train, evaluate,
publish. ``flows/`` wraps each one as a Prefect task; the CLI calls them directly. Nothing here
imports Prefect."""
