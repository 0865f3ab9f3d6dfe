"""Item images: concurrent, bounded, checked downloads into a cache keyed by a hash of the URL.

A missing, broken, too-large or undecodable image is recorded with its reason and never stops the
stage. "Too large" is checked twice: the compressed bytes (``max_bytes``), and the pixel count the
header declares (``max_pixels``) before any pixel is decoded, since a tiny PNG may declare a
30000x30000 canvas (a decompression bomb). File names in the cache come from ``sha256(url)``, never from the data.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from diffcl.core.io import atomic_path
from features.embedding_cache import content_key
from features.http import FetchError, Retry, RetryPolicy, get, new_client

log = logging.getLogger(__name__)


@dataclass
class ImageResult:
    url: str | None
    status: str  # "ok" or "missing"
    reason: str | None = None
    path: str | None = None
    sha256: str | None = None  # of the image bytes: the embedding cache key
    size: int | None = None  # of the cached file, with its mtime: lets a rerun skip re-hashing it
    mtime_ns: int | None = None


@dataclass(frozen=True)
class DownloadSettings:
    """``features.image.*`` of the config; the retry fields make the shared :class:`RetryPolicy`."""

    timeout_s: float = 20.0
    retries: int = 2
    backoff_s: float = 0.5
    max_bytes: int = 10_000_000
    workers: int = 8
    max_pixels: int = 40_000_000  # declared width x height; larger images are never decoded
    max_backoff_s: float = 10.0  # short: a Retry-After of minutes must not hold a download worker

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.retries, self.backoff_s, self.max_backoff_s)


class _Missing(Exception):
    pass


def cache_path(cache_dir: Path, url: str) -> Path:
    digest = content_key(url)
    return cache_dir / digest[:2] / f"{digest}.img"


class TooManyPixels(ValueError):
    """The image declares more pixels than allowed; raised before any pixel is decoded."""


@contextmanager
def open_capped(source: str | Path | io.BytesIO, max_pixels: int) -> Iterator[Image.Image]:
    """``Image.open`` (header only) refusing an image that declares more than ``max_pixels``
    pixels: the one place that decides the cap, for downloads, cached files and the encoder."""
    try:
        with Image.open(source) as img:
            if img.width * img.height > max_pixels:
                raise TooManyPixels(f"too many pixels ({img.width}x{img.height} = {img.width * img.height:,} > "
                                    f"{max_pixels:,}; decompression bomb?)")
            yield img
    except Image.DecompressionBombError as err:  # Pillow's own cap (open refuses > 2x its limit)
        raise TooManyPixels(f"too many pixels ({err})") from None


def check_image(data: bytes, max_pixels: int = DownloadSettings.max_pixels) -> None:
    """Raise _Missing unless ``data`` is a complete, decodable image of at most ``max_pixels``."""
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        raise _Missing("not an image (HTML page)")
    _check(io.BytesIO(data), max_pixels, decode=True)


def _check(source: Path | io.BytesIO, max_pixels: int, decode: bool) -> None:
    """``decode``: every pixel (catches truncated files that verify() lets through); else the
    header only, for a cached file that may have been cached under a larger ``max_pixels``."""
    try:
        with open_capped(source, max_pixels) as img:
            if decode:
                img.load()
                if img.width == 0 or img.height == 0:
                    raise _Missing("empty image")
    except TooManyPixels as err:
        raise _Missing(str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise _Missing(f"undecodable image ({type(err).__name__}: {str(err)[:80]})") from None


def _read_local(url: str, max_bytes: int) -> bytes:
    path = Path(unquote(urlparse(url).path)) if url.startswith("file://") else Path(url)
    if not path.exists():
        raise _Missing("file not found")
    if path.stat().st_size > max_bytes:
        raise _Missing(f"too large ({path.stat().st_size} bytes > {max_bytes})")
    return path.read_bytes()


def _download(client: httpx.Client, url: str, s: DownloadSettings) -> bytes:
    def receive(response: httpx.Response) -> bytes:
        declared = int(response.headers.get("Content-Length", 0) or 0)
        if declared > s.max_bytes:
            raise _Missing(f"too large ({declared} bytes > {s.max_bytes})")
        if "text/html" in response.headers.get("Content-Type", ""):
            raise _Missing("not an image (HTML page)")
        buffer = bytearray()
        for chunk in response.iter_bytes(1 << 16):
            buffer.extend(chunk)
            if len(buffer) > s.max_bytes:
                raise _Missing(f"too large (> {s.max_bytes} bytes)")
        if declared and len(buffer) != declared:
            raise Retry(f"transfer ended at {len(buffer)} of {declared} bytes")
        return bytes(buffer)

    try:
        return get(client, url, receive, s.policy)
    except FetchError as err:
        raise _Missing(err.reason) from None


def fetch_image(client: httpx.Client, url: str | None, cache_dir: Path, s: DownloadSettings,
                known: ImageResult | None = None) -> ImageResult:
    if not url:
        return ImageResult(url, "missing", "no image URL")
    target = cache_path(cache_dir, url)
    try:
        if target.exists():
            _check(target, s.max_pixels, decode=False)
            stat = target.stat()
            if known is not None and known.sha256 and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                return known  # the cached file is the one hashed last time
            data = target.read_bytes()
        else:
            data = _download(client, url, s) if url.startswith(("http://", "https://")) else _read_local(url, s.max_bytes)
            check_image(data, s.max_pixels)
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
    except _Missing as err:
        return ImageResult(url, "missing", str(err))
    stat = target.stat()
    return ImageResult(url, "ok", None, str(target), content_key(data), stat.st_size, stat.st_mtime_ns)


def fetch_images(urls: list[str | None], cache_dir: Path, settings: DownloadSettings, progress: bool = True,
                 known: dict[str, ImageResult] | None = None) -> list[ImageResult]:
    """One result per URL, in order; downloads run on a bounded thread pool. ``known``: the
    results of the previous run by URL, so that unchanged cached files are not read again."""
    known = known or {}
    cache_dir.mkdir(parents=True, exist_ok=True)
    client = new_client(settings.timeout_s, max_connections=settings.workers)
    bar = Progress(TextColumn("images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=True)
    try:
        with bar, ThreadPoolExecutor(max_workers=settings.workers) as pool:
            task = bar.add_task("images", total=len(urls))
            results = []
            for result in pool.map(lambda u: fetch_image(client, u, cache_dir, settings, known.get(u)), urls):
                results.append(result)
                bar.advance(task)
    finally:
        client.close()
    return results
