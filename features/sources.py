"""Where the published Amazon dumps live, and how a dataset config names its input files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from diffcl.core.config import DatasetConfig
from diffcl.core.io import is_url

# The 2014 dumps ("Image-based recommendations on styles and substitutes") behind the field's
# Baby / Sports / Clothing benchmarks (MMRec, FREEDOM, LGMRec, DiffMM).
AMAZON2014_BASE = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
PRESETS = {
    "baby": "Baby",
    "sports": "Sports_and_Outdoors",
    "clothing": "Clothing_Shoes_and_Jewelry",
}
AMAZON2018_BASE = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2"
AMAZON2023_BASE = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw"


def dump_urls(source: str, category: str) -> tuple[str, str]:
    """(reviews URL, meta URL) of a category in one generation of the dumps."""
    if source == "amazon2014":
        return (
            f"{AMAZON2014_BASE}/reviews_{category}_5.json.gz",
            f"{AMAZON2014_BASE}/meta_{category}.json.gz",
        )
    if source == "amazon2018":
        return (
            f"{AMAZON2018_BASE}/categoryFilesSmall/{category}_5.json.gz",
            f"{AMAZON2018_BASE}/metaFiles2/meta_{category}.json.gz",
        )
    if source == "amazon2023":
        return (
            f"{AMAZON2023_BASE}/review_categories/{category}.jsonl.gz",
            f"{AMAZON2023_BASE}/meta_categories/meta_{category}.jsonl.gz",
        )
    raise ValueError(f"no published dumps for source {source!r}")


@dataclass(frozen=True)
class SourceFile:
    """One input file of a dataset: ``role`` (reviews, meta, interactions, items) and where it is."""

    role: str
    location: str

    @property
    def is_remote(self) -> bool:
        """http(s) sources are downloaded; file:// URLs and paths are read in place."""
        return is_url(self.location) and not self.location.startswith("file://")

    @property
    def filename(self) -> str:
        return Path(unquote(urlparse(self.location).path)).name if is_url(self.location) else Path(self.location).name

    def local_path(self) -> Path:
        if self.location.startswith("file://"):
            return Path(unquote(urlparse(self.location).path))
        return Path(self.location)


def source_files(dataset: DatasetConfig) -> list[SourceFile]:
    """The files a dataset config names, with presets and categories expanded."""
    if dataset.source == "mmrec":
        # Every file of the folder is an input (read in place; hashed for provenance and caching).
        folder = Path(dataset.path)
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        return [SourceFile(p.name, str(p)) for p in files]
    if dataset.source == "tables":
        files = [SourceFile("interactions", dataset.interactions)]
        if dataset.items:
            files.append(SourceFile("items", dataset.items))
        return files
    reviews, meta = dataset.reviews, dataset.meta
    category = PRESETS[dataset.preset] if dataset.preset else dataset.category
    if category and reviews is None:
        reviews, default_meta = dump_urls(dataset.source, category)
        meta = meta or default_meta
    files = [SourceFile("reviews", reviews)]
    if meta:
        files.append(SourceFile("meta", meta))
    return files
