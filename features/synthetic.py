"""A small synthetic dataset in the real Amazon 2018 raw format, with planted structure.

Items belong to latent groups. A group shows in the item's text (its own vocabulary in title,
category and description) and in its pixels (its own hue and stripe orientation), and users prefer
one or two groups. So a model that reads text or images, or learns from co-interactions, can beat a
random ranking by a wide margin, and the tests and the offline demo can prove it.

Output: ``<out>/Demo_5.json.gz`` (reviews), ``<out>/meta_Demo.json.gz`` (metadata, imageURL pointing
at ``<image_base_url>/images/<asin>.png``) and ``<out>/images/*.png``; also ``groups.parquet`` (the
planted item groups, for tests).
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from diffcl.core.io import atomic_path, write_parquet_atomic

THEMES = [
    ("Feeding", ["bottle", "nipple", "bib", "formula", "spoon", "sippy"], (220, 60, 60)),
    ("Strollers", ["stroller", "wheel", "canopy", "jogger", "frame", "buggy"], (60, 160, 60)),
    ("Bathing", ["tub", "towel", "shampoo", "sponge", "washcloth", "rinse"], (60, 90, 220)),
    ("Nursery", ["crib", "mattress", "sheet", "mobile", "blanket", "bassinet"], (220, 200, 50)),
    ("Toys", ["rattle", "teether", "blocks", "plush", "puzzle", "activity"], (170, 60, 200)),
    ("Safety", ["gate", "monitor", "lock", "guard", "outlet", "corner"], (40, 190, 200)),
    ("Travel", ["carrier", "backpack", "seat", "cover", "organizer", "bag"], (240, 140, 40)),
    ("Health", ["thermometer", "aspirator", "lotion", "cream", "drops", "clipper"], (120, 120, 120)),
]
ADJECTIVES = ["soft", "deluxe", "compact", "classic", "organic", "premium", "easy", "portable"]
BRANDS = ["Acme Baby", "Little Ones", "Kiddo", "Nestwell", "Tinytots", "Bramble", "Cosy Co", "Sprout"]
FILLER = ["great", "quality", "for", "everyday", "use", "and", "the", "with", "gentle", "durable"]


@dataclass(frozen=True)
class DemoSpec:
    # Sparse on purpose: many items have few interactions, so the text and pixels of an item
    # matter, and a model that reads them beats one that only sees co-interactions.
    users: int = 500
    items: int = 600
    groups: int = 6
    min_per_user: int = 5
    max_per_user: int = 14
    preference: float = 0.85  # share of a user's interactions within the preferred groups
    image_size: int = 32
    seed: int = 7


def _image_png(rng: np.random.Generator, color: tuple[int, int, int], group: int, size: int) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    angle = np.pi * group / 8.0
    stripes = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.8) > 0).astype(np.float32)
    base = np.array(color, dtype=np.float32)
    pixels = base * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate(out: str | Path, spec: DemoSpec = DemoSpec(), image_base_url: str | None = None) -> dict[str, Path]:
    """Write the demo dataset under ``out``; returns the paths of the written files."""
    if spec.groups > len(THEMES):
        raise ValueError(f"at most {len(THEMES)} groups")
    out = Path(out).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    base = (image_base_url or out.as_uri()).rstrip("/")
    rng = np.random.default_rng(spec.seed)

    item_group = np.arange(spec.items) % spec.groups
    rng.shuffle(item_group)
    asins = [f"B0DEMO{i:04d}" for i in range(spec.items)]
    meta_lines = []
    for i, asin in enumerate(asins):
        name, words, color = THEMES[item_group[i]]
        noun, extra = rng.choice(words, 2, replace=False)
        brand = BRANDS[rng.integers(len(BRANDS))]
        title = f"{brand} {rng.choice(ADJECTIVES)} {noun} with {extra}"
        description = " ".join(rng.choice(words + FILLER, 12))
        png = _image_png(rng, color, int(item_group[i]), spec.image_size)
        (out / "images" / f"{asin}.png").write_bytes(png)
        url = f"{base}/images/{asin}.png"
        meta_lines.append({
            "asin": asin,
            "title": title,
            "brand": brand,
            "category": ["Baby Products", name],
            # Some descriptions carry HTML, as real 2018 metadata does.
            "description": [f"<p>{description}</p>" if i % 5 == 0 else description],
            "feature": [f"Made for {name.lower()}"],
            "main_cat": "Baby",
            "price": f"${rng.uniform(5, 80):.2f}",
            "imageURL": [url],
            "imageURLHighRes": [url],
        })

    # Users: preferred groups; popularity inside a group follows a Zipf-like law.
    popularity = 1.0 / (1.0 + rng.permutation(spec.items)) ** 0.6
    by_group = [np.flatnonzero(item_group == g) for g in range(spec.groups)]
    start = int(datetime(2016, 1, 1, tzinfo=timezone.utc).timestamp())
    reviews = []
    for u in range(spec.users):
        liked = rng.choice(spec.groups, size=1 + int(rng.random() < 0.4), replace=False)
        n = int(rng.integers(spec.min_per_user, spec.max_per_user + 1))
        inside = np.concatenate([by_group[g] for g in liked])
        n_in = min(int(round(n * spec.preference)), inside.size)
        p_in = popularity[inside] / popularity[inside].sum()
        chosen = list(rng.choice(inside, n_in, replace=False, p=p_in))
        outside = np.setdiff1d(np.arange(spec.items), inside)
        chosen += list(rng.choice(outside, n - n_in, replace=False))
        t = start + int(rng.integers(0, 86400 * 300))
        for item in chosen:
            t += int(rng.integers(3600, 86400 * 20))
            when = datetime.fromtimestamp(t, timezone.utc)
            reviews.append({
                "overall": float(rng.choice([3.0, 4.0, 5.0, 5.0])),
                "verified": True,
                "reviewTime": f"{when.month:02d} {when.day}, {when.year}",
                "reviewerID": f"ADEMOUSER{u:05d}",
                "asin": asins[item],
                "reviewerName": f"Parent {u}",
                "reviewText": "Works as described.",
                "summary": "Good",
                "unixReviewTime": t,
            })

    paths = {
        "reviews": out / "Demo_5.json.gz",
        "meta": out / "meta_Demo.json.gz",
        "groups": out / "groups.parquet",
        "images": out / "images",
    }
    _write_jsonl_gz(paths["reviews"], reviews)
    _write_jsonl_gz(paths["meta"], meta_lines)
    write_parquet_atomic(pl.DataFrame({"item_id": asins, "group": item_group.astype(np.int64)}), paths["groups"])
    return paths


def _write_jsonl_gz(path: Path, records: list[dict]) -> None:
    # mtime=0: the same data gives the same bytes, so a regenerated demo is not "fresh data".
    data = "".join(json.dumps(record) + "\n" for record in records).encode("utf-8")
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(data)
