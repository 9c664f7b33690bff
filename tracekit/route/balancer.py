"""Least-loaded DP rank of a group, by in-flight requests (single event loop: no locks needed)."""
from __future__ import annotations


class Balancer:
    """``inflight[r]``: requests sent to rank r and not finished; ``sent[r]``: requests ever sent there.

    :meth:`pick` takes the rank with the fewest in-flight requests among the candidates; ties go to the one sent
    the fewest requests so far (so sequential traffic spreads over a group instead of always hitting its first rank).
    """

    def __init__(self, dp_size: int):
        self.inflight = [0] * dp_size
        self.sent = [0] * dp_size

    def pick(self, ranks: list[int]) -> int:
        inflight, sent = self.inflight, self.sent
        best = ranks[0]
        for r in ranks[1:]:
            if inflight[r] < inflight[best] or (inflight[r] == inflight[best] and sent[r] < sent[best]):
                best = r
        return best

    def start(self, rank: int) -> None:
        if 0 <= rank < len(self.inflight):
            self.inflight[rank] += 1
            self.sent[rank] += 1

    def finish(self, rank: int) -> None:
        if 0 <= rank < len(self.inflight):
            self.inflight[rank] -= 1
