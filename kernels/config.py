"""`SpanConfig`: the hyperparameters of Superlinear attention, its presets and their validation.

Every path (oracle, torch, Triton, widgets) reads its geometry from a `SpanConfig`; the exact
integer tables derived from it live in `geometry.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import cached_property

# A float power (search p, span ρ) is snapped to the nearest fraction with a denominator up to this bound
# (docs/algorithm.md §1.3); anything further than `_FRACTION_TOLERANCE` from it is rejected. The span factors b_f, f_f
# are snapped the same way when they lie that close to such a fraction (1.9 means 19/10), and otherwise
# taken at their exact binary value: either way B(t), Fw(t) are ceilings of exact values (docs/algorithm.md §1.7).
_MAX_DENOMINATOR = 1000
_FRACTION_TOLERANCE = 1e-9

# Bounds on every parameter, so a bad config fails here with a clear message instead of overflowing (or
# running for minutes) on first use.
MAX_NUM_SPANS = 64  # K: beyond this the per-query work only pads (no preset or kernel needs more)
MAX_POSITION = 2**31 - 2  # positions and span bounds are int32 (docs/algorithm.md §2.4): W must fit below this
MIN_FACTOR, MAX_FACTOR = 2.0**-20, 2.0**20  # b_f in [MIN, MAX]; f_f = 0 or in [MIN, MAX]


def exact_fraction(value: float) -> Fraction:
    """The exact rational a float parameter stands for: the nearest fraction with denominator <= 1000
    when within 1e-9 of it (0.55 -> 11/20, 1.9 -> 19/10), else the float's exact binary value."""
    frac = Fraction(value).limit_denominator(_MAX_DENOMINATOR)
    return frac if abs(float(frac) - value) <= _FRACTION_TOLERANCE else Fraction(value)


@dataclass(frozen=True)
class SpanConfig:
    """Geometry of Superlinear attention (docs/algorithm.md §1). Frozen: derive a new one with `replace(...)`.

    Example::

        cfg = SpanConfig(sw_index=3, num_spans=2, search_power=0.5, span_power=0.5)
        cfg.window_len   # 15 = F(4) - 1
    """

    sw_index: int = 0  # σ: stripes 1..σ belong to the sliding window; W = F(σ+1) - 1
    num_spans: int = 3  # K: spans attended per query (the top-K stripes by search score)
    backward_factor: float = 2.0  # b_f: backward span length B(t) = ceil(b_f * t^ρ)
    forward_factor: float = 0.0  # f_f: forward span length Fw(t) = ceil(f_f * t^ρ)
    span_power: float = 0.5  # ρ in (0, 1): how span length grows with the query's position t
    search_power: float = 0.5  # p in (0, 1): stripe i sits F(i) = floor(i^(1/p)) keys back

    def __post_init__(self) -> None:
        def fail(field: str, value, expected: str):
            raise ValueError(f"SpanConfig.{field}={value!r}: expected {expected}")

        for field in ("sw_index", "num_spans"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(field, value, "an int")
        if self.sw_index < 0:
            fail("sw_index", self.sw_index, "an integer >= 0")
        if not 1 <= self.num_spans <= MAX_NUM_SPANS:
            fail("num_spans", self.num_spans, f"an integer in 1..{MAX_NUM_SPANS}")
        for field in ("backward_factor", "forward_factor", "span_power", "search_power"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(field, value, "a finite number")
        if not MIN_FACTOR <= self.backward_factor <= MAX_FACTOR:
            fail("backward_factor", self.backward_factor, "a number in [2^-20, 2^20]")
        if not (self.forward_factor == 0 or MIN_FACTOR <= self.forward_factor <= MAX_FACTOR):
            fail("forward_factor", self.forward_factor, "0 or a number in [2^-20, 2^20]")
        for field in ("span_power", "search_power"):
            value = getattr(self, field)
            if not 0 < value < 1:
                fail(field, value, "a number in (0, 1)")
            frac = Fraction(value).limit_denominator(_MAX_DENOMINATOR)
            if abs(float(frac) - value) > _FRACTION_TOLERANCE:
                fail(field, value, f"a fraction u/v with v <= {_MAX_DENOMINATOR} (nearest is {frac}, off by "
                                   f"{abs(float(frac) - value):.3g})")
        # W = F(σ + 1) - 1 must be a valid position: W > MAX_POSITION iff F(σ+1) >= MAX_POSITION + 2 iff
        # (MAX_POSITION + 2)^u <= (σ+1)^v (docs/algorithm.md §1.3), decided without computing F.
        u, v = self.power_fraction
        if self.sw_index >= MAX_POSITION or (MAX_POSITION + 2) ** u <= (self.sw_index + 1) ** v:
            fail("sw_index", self.sw_index, f"a window W = F(σ+1) - 1 <= {MAX_POSITION} (positions are int32); "
                                            f"search_power={self.search_power} makes F(σ+1) too large")

    # ----------------------------------------------------------------- presets
    @classmethod
    def default(cls) -> "SpanConfig":
        """Teaching / tiny-model preset: N = 2 stripes, W = 15, K = 2; coverage proven for any σ."""
        return cls(sw_index=3, num_spans=2, backward_factor=2.0, forward_factor=0.0,
                   span_power=0.5, search_power=0.5)

    @classmethod
    def release(cls) -> "SpanConfig":
        """The released model's preset (Superlinear-Exp-v0.1): p = ρ = 0.55, σ = 65 (W = 2032), K = 3."""
        return cls(sw_index=65, num_spans=3, backward_factor=3.0, forward_factor=1.0,
                   span_power=0.55, search_power=0.55)

    def replace(self, **changes) -> "SpanConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # ----------------------------------------------------------------- derived
    @property
    def topk(self) -> int:
        """Alias of `num_spans` (the kernel-level name)."""
        return self.num_spans

    @cached_property
    def power_fraction(self) -> tuple[int, int]:
        """(u, v) in lowest terms with p = u/v; integer mode p = 1/N gives (1, N)."""
        frac = Fraction(self.search_power).limit_denominator(_MAX_DENOMINATOR)
        return frac.numerator, frac.denominator

    @cached_property
    def span_fraction(self) -> tuple[int, int]:
        """(u, v) in lowest terms with ρ = u/v (docs/algorithm.md §1.7: B(t) = ceil(b_f t^(u/v)) on exact values)."""
        frac = Fraction(self.span_power).limit_denominator(_MAX_DENOMINATOR)
        return frac.numerator, frac.denominator

    @cached_property
    def factor_fractions(self) -> tuple[Fraction, Fraction]:
        """(b_f, f_f) as the exact rationals they stand for (see `exact_fraction`)."""
        return exact_fraction(self.backward_factor), exact_fraction(self.forward_factor)

    @property
    def inv_search_power_int(self) -> int | None:
        """N when p = 1/N exactly (integer mode), else None."""
        u, v = self.power_fraction
        return v if u == 1 else None

    @cached_property
    def window_len(self) -> int:
        """W = F(σ + 1) - 1, the sliding-window length (0 when σ = 0)."""
        from .geometry import stripe_offset

        return stripe_offset(self, self.sw_index + 1) - 1

    def to_dict(self) -> dict:
        """JSON-serialisable fields."""
        return {
            "sw_index": self.sw_index,
            "num_spans": self.num_spans,
            "backward_factor": float(self.backward_factor),
            "forward_factor": float(self.forward_factor),
            "span_power": float(self.span_power),
            "search_power": float(self.search_power),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SpanConfig":
        """Inverse of `to_dict`; unknown keys are an error."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"SpanConfig.from_dict: unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_kernel_args(cls, *, sw_index: int = 0, num_spans: int = 3, backward_factor: float = 2.0,
                         forward_factor: float = 0.0, span_power: float = 0.5,
                         search_power: float | None = None,
                         inv_search_power_int: int | None = None) -> "SpanConfig":
        """Build from the kernel-level argument list of docs/algorithm.md §3.5 (exactly one of the two powers)."""
        if (search_power is None) == (inv_search_power_int is None):
            if search_power is None and inv_search_power_int is None:
                inv_search_power_int = 2
            else:
                raise ValueError("give exactly one of search_power and inv_search_power_int")
        if inv_search_power_int is not None:
            if isinstance(inv_search_power_int, bool) or inv_search_power_int not in range(2, 7):
                raise ValueError(f"inv_search_power_int={inv_search_power_int!r}: expected an int in 2..6")
            search_power = 1.0 / inv_search_power_int
        return cls(sw_index=sw_index, num_spans=num_spans, backward_factor=backward_factor,
                   forward_factor=forward_factor, span_power=span_power, search_power=search_power)
