"""A worker's link: what it can send and receive, in bytes per second, converted from bits once.

Operators and the wire contract speak bits per second (`--link-mbps`, the profile's
`upload_bps` and `download_bps`); everything that paces or plans a transfer divides bytes by
a rate, so the conversion happens here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BITS_PER_BYTE = 8


@dataclass(frozen=True)
class Link:
    upload_bytes_per_s: float
    download_bytes_per_s: float

    def __post_init__(self) -> None:
        for name in ("upload_bytes_per_s", "download_bytes_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (got {value!r})")

    @classmethod
    def from_bits_per_s(cls, upload_bps: float, download_bps: float) -> Link:
        return cls(upload_bps / BITS_PER_BYTE, download_bps / BITS_PER_BYTE)

    @classmethod
    def from_mbps(cls, upload_mbps: float, download_mbps: float | None = None) -> Link:
        """Mbit/s (10^6 bits) each way; one figure for both when `download_mbps` is left out."""
        down = upload_mbps if download_mbps is None else download_mbps
        return cls.from_bits_per_s(upload_mbps * 1e6, down * 1e6)

    @property
    def upload_bps(self) -> float:
        return self.upload_bytes_per_s * BITS_PER_BYTE

    @property
    def download_bps(self) -> float:
        return self.download_bytes_per_s * BITS_PER_BYTE

    @property
    def bottleneck_bytes_per_s(self) -> float:
        """The slower direction: a boundary tensor crosses one way and its gradient comes back."""
        return min(self.upload_bytes_per_s, self.download_bytes_per_s)

    def describe(self) -> str:
        up, down = self.upload_bps / 1e6, self.download_bps / 1e6
        return f"link {up:g} Mbit/s" if up == down else f"link {up:g} Mbit/s up, {down:g} Mbit/s down"
