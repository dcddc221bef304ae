"""Parse layer / head selections such as "all", "0,4,8-11", "-1" (last) against a model size."""

from __future__ import annotations

from vlmcredit.errors import VlmCreditError


def parse_indices(text: str | None, count: int, option: str) -> list[int] | None:
    """Sorted indices for `text`; None for "all"/empty. Negative numbers count from the end."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:  # a range a-b (a may itself be negative)
                cut = part.index("-", 1)
                lo, hi = _index(part[:cut], count), _index(part[cut + 1 :], count)
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(_index(part, count))
        except ValueError:
            raise VlmCreditError(
                f"{option} {text!r}: {part!r} is not an index or range in 0..{count - 1} "
                "(use e.g. 'all', '0,2,5-7' or '-1' for the last)"
            ) from None
    return sorted(out)


def _index(token: str, count: int) -> int:
    value = int(token)
    if value < 0:
        value += count
    if not 0 <= value < count:
        raise ValueError
    return value
