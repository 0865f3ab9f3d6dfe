"""flows: orchestration (Prefect flows, the `diffcl` command line). No model or data logic here."""
