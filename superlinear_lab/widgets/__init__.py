"""Views on routing: plain controllers (state + actions, testable without a browser) with thin ipywidgets 8 /
plotly `FigureWidget` views, a static plotly fallback and self-contained `to_html` export.

Arrows go one way: these views read `superlinear_lab` (traces, sessions) and `superlinear_kernels` (geometry);
nothing below imports them.
"""
from ._base import View, ViewError
from .coverage_map import CoverageMap, look_back
from .missed import Evidence, MissedSpanDebugger, char_to_token
from .routing import RoutingExplorer, routing_map
from .session import SessionPanel, SnapshotPanel
from .stripes import StripeExplorer, stripe_geometry

__all__ = ["View", "ViewError", "StripeExplorer", "stripe_geometry", "RoutingExplorer", "routing_map",
           "CoverageMap", "look_back", "MissedSpanDebugger", "Evidence", "char_to_token", "SessionPanel",
           "SnapshotPanel"]
