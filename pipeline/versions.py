"""The code version of each stage, the one place they are kept: part of every cached stage's key
(``flows.cache``) and of what a stage records about its outputs (``stats.json``'s stage_version).
Bump a stage's number when its outputs change for the same inputs and config. (publish stays at 1
through session 18's rules for a missing metric: each case they change used to fail, so no cached
output differs, and a new key would register every published run once more.)"""

STAGE_VERSIONS = {
    "fetch": 1, "prepare": 4, "images": 1, "text_features": 2, "image_features": 2, "features": 2,
    "graphs": 3, "train": 3, "evaluate": 3, "publish": 1,
}
