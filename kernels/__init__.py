"""superlinear_kernels: the engine's math — exact geometry, the dense oracle, the torch backend and the
Triton kernels of Superlinear Multi-Step Attention. Knows nothing of notebooks or models."""
from .config import SpanConfig
from .geometry import CoverageReport, coverage, query_geometry, stripe_offset, stripe_table
from .api import SearchResult, StripeScores, span_search, stripe_scores, superlinear_attention

__all__ = [
    "SpanConfig",
    "CoverageReport",
    "coverage",
    "query_geometry",
    "stripe_offset",
    "stripe_table",
    "SearchResult",
    "span_search",
    "StripeScores",
    "stripe_scores",
    "superlinear_attention",
]
