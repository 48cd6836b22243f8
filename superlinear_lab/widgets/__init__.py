"""Views on routing: plain controllers (state + actions, testable without a browser) with thin ipywidgets 8 /
plotly `FigureWidget` views, a static plotly fallback and self-contained `to_html` export.

Arrows go one way: these views read `superlinear_lab` (traces, sessions) and `superlinear_kernels` (geometry);
nothing below imports them.
"""
from ._base import View, ViewError
from .stripes import StripeExplorer, stripe_geometry

__all__ = ["View", "ViewError", "StripeExplorer", "stripe_geometry"]
