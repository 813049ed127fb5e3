"""Matplotlib without a display: a figure as PNG bytes, written or inlined by the caller."""

from __future__ import annotations

import io
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    """Render and close `fig`."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plain_log_ticks(axis: Any) -> None:
    """Tick labels of a log-scale axis as plain numbers (`3`, `1060`, not `3×10⁰`); minor ticks labelled only
    when the axis spans less than two decades (otherwise they crowd). Call after plotting."""
    import math

    from matplotlib.ticker import FuncFormatter, NullFormatter

    low, high = sorted(axis.get_view_interval())
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    narrow = low > 0 and math.log10(high / low) < 2
    axis.set_minor_formatter(plain if narrow else NullFormatter())
