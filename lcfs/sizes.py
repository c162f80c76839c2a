"""Parsing and formatting of byte sizes given on the command line.

Suffixes are binary multiples, as in dd and truncate: ``K`` is 1024 bytes,
``M`` is 1024**2, ``G`` 1024**3 and ``T`` 1024**4. The forms ``10G``,
``10GB``, ``10GiB`` and ``10g`` mean the same; a plain number is bytes.
"""

import re
from decimal import Decimal

_MULTIPLIERS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

_SIZE_RE = re.compile(
    r"\s*(?P<number>\d+(?:\.\d+)?)\s*(?:(?P<unit>[KMGT])I?)?B?\s*", re.IGNORECASE
)

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def parse_size(text: str) -> int:
    """Return the number of bytes that ``text`` (``512M``, ``64G``, ``4096``) names.

    A fractional number is allowed with a suffix (``1.5G``) and is rounded
    down to whole bytes. Raises ValueError naming the text when it is not a
    size.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: use a number of bytes with an optional "
            "K, M, G or T suffix, for example 64G"
        )
    unit = (match["unit"] or "").upper()
    number = match["number"]
    if "." in number and not unit:
        raise ValueError(f"invalid size {text!r}: a number of bytes must be whole")
    return int(Decimal(number) * _MULTIPLIERS[unit])


def format_size(size: int) -> str:
    """Return ``size`` in bytes as a short text in binary units, e.g. ``1.5 GiB``."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}"
