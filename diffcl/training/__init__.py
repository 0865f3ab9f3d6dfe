"""Training and evaluation shared by every model: the BPR sampler, the full-ranking evaluator, the
trainer with its run folder, data-parallel training, and the hyper-parameter search."""
