"""A stand-in for what a planted pickle could do, shared by the tests that prove none is unpickled."""

from __future__ import annotations

from pathlib import Path


class CreatesFile:
    """Unpickling this creates ``path``: what a planted pickle could do with os.system."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
