import numpy as np
import polars as pl
import pytest

from features.filtering import assign_split, deduplicate, kcore, users_without_train


def brute_kcore(pairs: set[tuple[int, int]], k: int) -> set[tuple[int, int]]:
    """The obvious reference: remove one offending node at a time until none is left."""
    pairs = set(pairs)
    while True:
        users, items = {}, {}
        for u, i in pairs:
            users[u] = users.get(u, 0) + 1
            items[i] = items.get(i, 0) + 1
        bad_u = {u for u, c in users.items() if c < k}
        bad_i = {i for i, c in items.items() if c < k}
        if not bad_u and not bad_i:
            return pairs
        node = ("u", min(bad_u)) if bad_u else ("i", min(bad_i))
        pairs = {(u, i) for u, i in pairs if (node != ("u", u) and node != ("i", i))}


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_kcore_matches_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    users = rng.integers(0, 40, n)
    items = (rng.zipf(1.6, n) % 60)
    pairs = set(zip(users.tolist(), items.tolist(), strict=True))
    frame = pl.DataFrame({"user_id": [p[0] for p in pairs], "item_id": [p[1] for p in pairs]})
    got = set(kcore(frame, k).iter_rows())
    assert got == brute_kcore(pairs, k)


def test_deduplicate_keeps_latest():
    frame = pl.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "x", "x"], "timestamp": [5, 1, 3],
                          "rating": [2.0, 5.0, 4.0]})
    out = deduplicate(frame).sort("user_id")
    assert out.get_column("rating").to_list() == [2.0, 4.0]


def _frame(sizes: list[int], with_time: bool = False) -> pl.DataFrame:
    users = np.repeat(np.arange(len(sizes)), sizes)
    items = np.concatenate([np.arange(s) for s in sizes])
    cols = {"user": users, "item": items}
    if with_time:
        cols["timestamp"] = items * 10  # item index = time order
    return pl.DataFrame(cols)


def test_split_rule_counts_per_user():
    sizes = [5, 9, 10, 20, 37]
    out = assign_split(_frame(sizes), ratios=(0.8, 0.1, 0.1), seed=1)
    counts = out.group_by("user").agg(
        (pl.col("split") == s).sum().alias(s) for s in ("train", "valid", "test")
    ).sort("user")
    expected = []
    for n in sizes:
        if n < 10:
            expected.append((n - 2, 1, 1))
        else:
            v = t = max(1, round(n * 0.1))
            expected.append((n - v - t, v, t))
    assert list(zip(*(counts.get_column(c).to_list() for c in ("train", "valid", "test")), strict=True)) == expected


def test_split_is_seeded_and_random():
    frame = _frame([30] * 20)
    a = assign_split(frame, ratios=(0.8, 0.1, 0.1), seed=3)
    b = assign_split(frame, ratios=(0.8, 0.1, 0.1), seed=3)
    c = assign_split(frame, ratios=(0.8, 0.1, 0.1), seed=4)
    assert a.equals(b)
    assert not a.sort("user", "item").equals(c.sort("user", "item"))
    # Random, not "the last items": test items are spread over the item range.
    test_items = a.filter(pl.col("split") == "test").get_column("item")
    assert test_items.min() < 20


def test_chronological_split_takes_latest_for_test():
    out = assign_split(_frame([12, 6], with_time=True), ratios=(0.8, 0.1, 0.1), seed=0, order="timestamp")
    for user, n in ((0, 12), (1, 6)):
        rows = out.filter(pl.col("user") == user).sort("timestamp")
        assert rows.get_column("split").to_list()[-1] == "test"
        assert rows.get_column("split").to_list()[-2] == "valid"
        assert rows.get_column("split").to_list()[: n - 2] == ["train"] * (n - 2)


def test_users_without_training_items_are_found():
    out = assign_split(_frame([2, 10]), ratios=(0.8, 0.1, 0.1), seed=0)
    assert users_without_train(out).to_list() == [0]  # prepare drops them (test_modalities)
