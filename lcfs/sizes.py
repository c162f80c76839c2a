"""Parser for the byte sizes given on the command line.

Suffixes are binary multiples: ``K`` is 1024 bytes, ``M`` is 1024**2, ``G``
1024**3 and ``T`` 1024**4, in either case. A trailing ``B`` or ``iB`` changes
nothing, so ``10G``, ``10GB`` and ``10GiB`` all mean 10 * 1024**3 bytes. A
plain number is bytes.
"""

import re
from decimal import Decimal

_MULTIPLIERS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

_SIZE_RE = re.compile(
    r"\s*(?P<number>\d+(?:\.\d+)?)\s*(?:(?P<unit>[KMGT])I?)?B?\s*", re.IGNORECASE
)


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
