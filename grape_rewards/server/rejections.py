"""The server-side trace of rejected requests: one rate-limited WARNING line per reason.

A client may never read a 4xx body (OpenRLHF's remote reward client does not: a bad label becomes a ``None``
reward and the training run goes on), so the service logs why it refused, without flooding the log when a
trainer sends the same bad request thousands of times.

The rule (:class:`RejectionLog`):

* a reason (the status and the message, cut to ``max_chars``) is logged at most once per ``interval_s``; the next
  line for that reason says how many like it were not logged in between;
* at most ``max_lines`` lines are logged per ``interval_s`` in all (reasons that differ per request, e.g. a
  different bad id each time, cannot flood either); the next line logged says how many were dropped by this cap;
* a line holds the route, the status and the reason message only: never a header (the bearer token) or the body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

INTERVAL_S = 60.0
"""The window of the rate limit, in seconds."""
MAX_LINES = 20
"""At most this many lines per window, all reasons together."""
MAX_CHARS = 300
"""A reason is cut to this many characters in the log (and told apart from others by this prefix)."""
MAX_REASONS = 1024
"""The reasons remembered at once (the oldest-logged is forgotten first), so memory stays bounded."""


def shorten(message: str, max_chars: int = MAX_CHARS) -> str:
    """``message`` on one line, cut to ``max_chars`` characters (an ellipsis marks the cut).

    >>> shorten("bad\\nlabel", 40), shorten("x" * 10, 5)
    ('bad\\\\nlabel', 'xxxx…')
    """
    line = message.replace("\r", "\\r").replace("\n", "\\n")
    return line if len(line) <= max_chars else line[:max_chars - 1] + "…"


class RejectionLog:
    """Logs each rejected request's reason at WARNING, rate-limited by the rule in the module docstring.

    Args:
        logger: where the lines go.
        interval_s: the window: one line per reason per window, and at most ``max_lines`` lines per window.
        max_lines: the cap on lines per window, all reasons together.
        max_chars: a reason is cut to this many characters.
        max_reasons: how many reasons are remembered at once.
        clock: seconds, monotonic (a test passes a fake one).
    """

    def __init__(self, logger: logging.Logger, interval_s: float = INTERVAL_S, max_lines: int = MAX_LINES,
                 max_chars: int = MAX_CHARS, max_reasons: int = MAX_REASONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0 or max_lines < 1 or max_chars < 1 or max_reasons < 1:
            raise ValueError(f"RejectionLog needs interval_s > 0 and max_lines, max_chars, max_reasons >= 1; got "
                             f"interval_s={interval_s}, max_lines={max_lines}, max_chars={max_chars}, "
                             f"max_reasons={max_reasons}")
        self.logger = logger
        self.interval_s = interval_s
        self.max_lines = max_lines
        self.max_chars = max_chars
        self.max_reasons = max_reasons
        self.clock = clock
        self._logged_at: dict[tuple[int, str], float] = {}
        """When each reason was last logged, oldest first."""
        self._suppressed: dict[tuple[int, str], int] = {}
        """Per reason: rejections not logged since its last line."""
        self._dropped = 0
        """Rejections not logged because of the cap on lines (or whose reason was forgotten) since the last line."""
        self._window_start = float("-inf")
        self._window_lines = 0

    def note(self, where: str, status: int, message: str) -> bool:
        """Record one rejection of a request to ``where`` with ``status``; True when it was logged."""
        now = self.clock()
        reason = shorten(message, self.max_chars)
        key = (status, reason)
        last = self._logged_at.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if now - self._window_start >= self.interval_s:
            self._window_start, self._window_lines = now, 0
        if self._window_lines >= self.max_lines:
            self._dropped += 1
            return False
        self._window_lines += 1
        like_it = self._suppressed.pop(key, 0)
        self._logged_at.pop(key, None)
        self._logged_at[key] = now  # to the end: the dict stays ordered by when each reason was logged
        self._forget_oldest()
        notes = []
        if like_it:
            notes.append(f"{like_it} more like it in the last {self.interval_s:g} s were not logged")
        if self._dropped:
            notes.append(f"{self._dropped} other rejections were not logged (at most {self.max_lines} lines "
                         f"per {self.interval_s:g} s)")
            self._dropped = 0
        tail = f" ({'; '.join(notes)})" if notes else ""
        self.logger.warning("rejected a request to %s with %d: %s%s", where, status, reason, tail)
        return True

    def _forget_oldest(self) -> None:
        while len(self._logged_at) > self.max_reasons:
            key = next(iter(self._logged_at))
            del self._logged_at[key]
            self._dropped += self._suppressed.pop(key, 0)
