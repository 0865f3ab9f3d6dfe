import numpy as np
import scipy.sparse as sp

from diffcl.training.sampler import BPRSampler


def test_epoch_covers_every_pair_once_and_negatives_are_never_positives():
    rng = np.random.default_rng(0)
    train = sp.csr_matrix((rng.random((50, 30)) < 0.3).astype(np.float32))
    sampler = BPRSampler(train, batch_size=64, seed=1)
    batches = list(sampler.epoch())
    users = np.concatenate([b[0].numpy() for b in batches])
    pos = np.concatenate([b[1].numpy() for b in batches])
    neg = np.concatenate([b[2].numpy() for b in batches])
    assert len(batches) == len(sampler)
    assert sorted(zip(users.tolist(), pos.tolist(), strict=True)) == sorted(zip(*train.nonzero(), strict=True))
    dense = train.toarray()
    assert dense[users, pos].all()
    assert not dense[users, neg].any()


def test_negatives_are_uniform_over_non_positives():
    train = sp.csr_matrix(np.eye(4, 10, dtype=np.float32))
    sampler = BPRSampler(train, batch_size=4, seed=0)
    users = np.zeros(90000, dtype=np.int64)
    counts = np.bincount(sampler.negatives(users), minlength=10)
    assert counts[0] == 0
    assert np.allclose(counts[1:] / counts[1:].sum(), 1 / 9, atol=0.01)


def test_seeded():
    train = sp.random(40, 40, density=0.2, format="csr", random_state=0)
    a = [b[2].numpy() for b in BPRSampler(train, 16, seed=5).epoch()]
    b = [b[2].numpy() for b in BPRSampler(train, 16, seed=5).epoch()]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
