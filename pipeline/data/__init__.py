"""Deterministic, balanced, exactly and elastically resumable WebDataset streams (see order.py)."""

from pipeline.data.loader import DataStop, StreamingLoader

__all__ = ["DataStop", "StreamingLoader"]
