"""The integer helpers every layer uses (one definition each): ceil-div, round-up, buckets."""

from __future__ import annotations


def ceil_div(a: int, b: int) -> int:
  """ceil(a / b) for ints, b > 0."""
  return -(-a // b)


def round_up(n: int, multiple: int) -> int:
  """Smallest multiple of `multiple` >= n."""
  return ceil_div(n, multiple) * multiple


def next_power_of_two(n: int, minimum: int = 1) -> int:
  """Smallest power of two >= max(n, minimum) (the shape buckets of jitted programs)."""
  return 1 << max(0, (max(n, minimum) - 1).bit_length())
