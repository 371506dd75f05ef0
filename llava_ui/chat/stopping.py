"""Stop strings (the API's `stop`): cut the text at the first one and never stream part of it."""
from __future__ import annotations


class StopStrings:
    def __init__(self, stops=()):
        self.stops = [s for s in (stops or ()) if s]
        self.buffer = ""  # all text seen
        self.text = ""  # text released to the caller

    def feed(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """Add decoded text; returns (text safe to release now, whether a stop string was hit)."""
        self.buffer += delta
        for stop in self.stops:
            at = self.buffer.find(stop)
            if at != -1:
                return self._release(self.buffer[:at]), True
        if final or not self.stops:
            return self._release(self.buffer), False
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.buffer.endswith(s[:n])), default=0)
        return self._release(self.buffer[:len(self.buffer) - hold]), False

    def _release(self, upto: str) -> str:
        out = upto[len(self.text):]
        self.text = upto
        return out
