"""The ground floor both the data layer (``features/``) and the model library stand on: the typed
config, file I/O, the workspace layout and locks, the feature-file and prepared-table formats, the
metric names and the device choice. It imports nothing from the floors above."""
