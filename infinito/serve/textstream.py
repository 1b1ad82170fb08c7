"""Token ids to streamed text, with OpenAI's stop-sequence rule.

A token can end in the middle of a UTF-8 character (GPT-2's BPE works on bytes) and a stop
sequence can span tokens, so text is released only once it is final: the whole continuation is
decoded after every token, a trailing replacement character (an unfinished character) and any
tail that could still grow into a stop sequence are held back, and the rest is sent. When a
stop sequence appears, the text before it is the last delta and the stop sequence itself is
never sent (as OpenAI's API does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]

_UNFINISHED = "\ufffd"  # what the decoder shows for an incomplete UTF-8 sequence


class TextStream:
    """Feed tokens with ``add``; each call returns (new final text, whether a stop matched)."""

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        self.text = self.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            delta = self.text[self.sent : max(cut, self.sent)]
            self.sent = max(cut, self.sent)
            self.text = self.text[:cut]
            return delta, True
        end = len(self.text) - self._held_back()
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta, False

    def flush(self) -> str:
        """What is still held back, released at the end of generation."""
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta

    def _held_back(self) -> int:
        """Length of the tail that is not final yet."""
        text = self.text
        hold = len(text) - len(text.rstrip(_UNFINISHED))
        for s in self.stop:  # the longest tail that is a proper prefix of a stop sequence
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold
