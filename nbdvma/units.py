"""Sizes as people write and read them: ``64K``, ``1.5G`` in; ``860.0 MiB`` out."""

from __future__ import annotations

__all__ = ["format_bytes", "parse_size"]

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``123``, ``64K``, ``1.5G``... (binary suffixes, optional ``iB``/``B``).

    Raises:
        ValueError: not a positive whole number of bytes (the message says so).
    """
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1:] if t[-1:] in _SUFFIXES else ""
    number = t[: len(t) - len(suffix)]
    try:
        value = (
            float(number) * _SUFFIXES[suffix] if "." in number else int(number) * _SUFFIXES[suffix]
        )
    except ValueError:
        raise ValueError(f"invalid size {text!r} (bytes, or with a K/M/G/T suffix)") from None
    if value <= 0 or value != int(value):
        raise ValueError(f"invalid size {text!r}: must be a positive whole number of bytes")
    return int(value)


def format_bytes(n: float) -> str:
    """``860.0 MiB``, as vzdump prints sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover
