"""What the stages report to the metrics sink, so that ``metrics`` needs no stage module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RelayReport:
    """What one relay pass did."""

    claimed: int
    created: int
    deduplicated: int
    fallback_used: int
    rejected: dict[str, int]  # by reason class
    # the claim took all it could (rows or bytes): more may be pending, claim again at once
    full: bool = False

    @property
    def relayed(self) -> int:
        return self.created + self.deduplicated
