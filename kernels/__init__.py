"""superlinear_kernels: the engine's math — exact geometry, the dense oracle, the torch backend and the
Triton kernels of Superlinear Multi-Step Attention. Knows nothing of notebooks or models."""
from importlib.metadata import PackageNotFoundError, version

try:  # the one version: pyproject.toml's, through the installed distribution (superlinear_lab re-exports it)
    __version__ = version("superlinear-lab")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

from .config import SpanConfig
from .geometry import (CoverageReport, QueryGeometry, coverage, query_geometry, stripe_offset, stripe_table,
                       window_bounds)
from .api import DecodeAttention, SearchResult, StripeScores, span_search, stripe_scores, superlinear_attention

__all__ = [
    "__version__",
    "SpanConfig",
    "CoverageReport",
    "coverage",
    "query_geometry",
    "QueryGeometry",
    "window_bounds",
    "stripe_offset",
    "stripe_table",
    "SearchResult",
    "span_search",
    "StripeScores",
    "stripe_scores",
    "superlinear_attention",
    "DecodeAttention",
]
