"""The L-inf budget of the noise methods, as the command line and Python spell it (``16/255``, ``0.0627``)."""

from __future__ import annotations

from ..errors import UEDatasetsError


def parse_eps(value: str | float) -> float:
    """``"16/255"``, ``"0.0627"`` or a float -> a float in (0, 1]."""
    if isinstance(value, str):
        try:
            num, _, den = value.partition("/")
            eps = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise UEDatasetsError(f"eps {value!r}: give a fraction like 16/255 or a number in (0, 1]") from None
    else:
        eps = float(value)
    if not 0 < eps <= 1:
        raise UEDatasetsError(f"eps must be in (0, 1] (in units of the pixel range), got {eps}")
    return eps
