"""Item images -> open_clip embeddings, decoding and preprocessing overlapped with encoding."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from features.embedding_cache import content_key, weights_hash
from features.image_download import DownloadSettings, open_capped

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "clip_configs"
# Seeding and drawing random weights touch torch's global generator: shards encoding in threads of
# one process (Prefect's default task runner) would interleave their draws and get other weights;
# hence the lock here, and a DataLoader with its own generator.
_SEEDED_INIT = threading.Lock()
UNTRAINED_NOTE = "features come from an UNTRAINED image encoder (random weights): no learned visual semantics"


@dataclass(frozen=True)
class ClipSpec:
    architecture: str
    pretrained: str | None
    identity: str
    weights_sha256: str | None

    @property
    def untrained(self) -> bool:
        return self.pretrained is None


def register_configs() -> None:
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)


def resolve_clip(architecture: str, pretrained: str | None, memo_file: Path) -> ClipSpec:
    if pretrained is None:
        return ClipSpec(architecture, None, content_key(f"random:{architecture}"), None)
    path = Path(pretrained).expanduser()
    if path.exists():
        digest = weights_hash(path.resolve(), memo_file)
        return ClipSpec(architecture, str(path.resolve()), content_key(f"{architecture}:{digest}"), digest)
    return ClipSpec(architecture, pretrained, content_key(f"{architecture}:{pretrained}"), None)


def load_clip(spec: ClipSpec, device: str, seed: int = 0):
    """(model, preprocess). With ``pretrained`` unset the weights are random (seeded), and the
    caller must say so wherever the features are used."""
    import open_clip

    register_configs()
    if spec.architecture not in open_clip.list_models():
        raise ValueError(f"features.image.model: unknown open_clip architecture {spec.architecture!r}")
    try:
        with _SEEDED_INIT:
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.architecture, pretrained=spec.pretrained, device=device
            )
    except Exception as err:  # a hub tag without a network, a checkpoint of another architecture
        raise RuntimeError(
            f"features.image.pretrained: cannot load {spec.pretrained!r} for {spec.architecture} ({err}). "
            "Offline, point it at a local checkpoint file"
        ) from err
    model.eval()
    if spec.untrained:
        log.warning("image encoder %s: %s", spec.architecture, UNTRAINED_NOTE)
    return model, preprocess


class _ImageFiles(torch.utils.data.Dataset):
    """The images stage only caches images within the pixel cap; the cap is checked here again
    before decoding, so a file put into the cache by other means cannot exhaust memory."""

    def __init__(self, paths: list[str], preprocess, max_pixels: int):
        self.paths, self.preprocess, self.max_pixels = paths, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.paths[i]
        try:
            with open_capped(path, self.max_pixels) as img:  # refused before any pixel is decoded
                return self.preprocess(img.convert("RGB"))
        except ValueError as err:  # TooManyPixels among them
            raise ValueError(f"{path}: not encoded, {err}; delete it and rerun `diffcl features`") from None


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the encoder for cores


@torch.no_grad()
def encode_images(model, preprocess, paths: list[str], batch_size: int, workers: int, device: str,
                  progress: bool = True, max_pixels: int = DownloadSettings.max_pixels) -> np.ndarray:
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, preprocess, max_pixels), batch_size=batch_size, num_workers=workers,
        worker_init_fn=_worker_init if workers else None, persistent_workers=False,
        generator=torch.Generator(),  # its seed draw must not touch the global generator (see _SEEDED_INIT)
    )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    out = []
    bar = Progress(TextColumn("encode images"), BarColumn(), MofNCompleteColumn(), disable=not progress, transient=True)
    with bar:
        task = bar.add_task("encode", total=len(paths))
        for batch in loader:
            out.append(model.encode_image(batch.to(device)).float().cpu().numpy())
            bar.advance(task, len(batch))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
