"""One check, one message, for the integer arguments of the numerics (sizes, counts, ranks)."""

from __future__ import annotations

from typing import Any

from stackcomp.factorize.omp import FactorizeError

__all__ = ["check_int"]


def check_int(who: str, what: str, v: Any, minimum: int = 1, maximum: int | None = None,
              maximum_name: str = "") -> None:
    """Raise ``FactorizeError("{who}: {what} must be ...")`` unless ``v`` is an int (not a bool) in
    ``[minimum, maximum]``; ``maximum_name`` names the bound in the message (``atoms=16``)."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= minimum and (maximum is None or v <= maximum):
        return
    if maximum is not None:
        expected = f"an int in [{minimum}, {maximum_name + '=' if maximum_name else ''}{maximum}]"
    else:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise FactorizeError(f"{who}: {what} must be {expected}, got {v!r}")
