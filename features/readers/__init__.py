"""Readers turn each input form into one normalised :class:`RawData` (string ids, raw fields)."""

from features.readers.base import RawData
from features.readers.dispatch import read_dataset

__all__ = ["RawData", "read_dataset"]
