"""Incremental detokenization with stop strings: emit only text that can no longer change or be cut."""

from __future__ import annotations


class TextStream:
    """push(token) → text safe to send now. Holds back an incomplete UTF-8 character and any tail that could
    still become a stop string; once a stop string appears, the text ends just before it (`stopped`)."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.emitted = 0      # characters already returned
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s, max(self.emitted - len(s), 0)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = text[:min(hits)]
            return self._take(len(self.text))
        self.text = text
        safe = len(text) - (1 if text.endswith("\ufffd") else 0)
        hold = 0
        for s in self.stop:  # the longest tail that is a proper prefix of a stop string
            hold = max([hold] + [k for k in range(1, min(len(s) - 1, safe) + 1) if text[safe - k:safe] == s[:k]])
        safe -= hold
        return self._take(max(safe, self.emitted))

    def flush(self) -> str:
        """At the end of generation: everything not yet sent."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out
