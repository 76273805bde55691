"""matplotlib for the chart writers, headless and imported only when a chart is drawn (the optional
``plot`` extra)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
