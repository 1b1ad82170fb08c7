"""The Hugging Face Hub, probed before use: an unreachable Hub fails in seconds, not minutes.

The Hub libraries retry a dead connection for a long time before giving up; one short request
first tells the callers (the download stage, the init stage) to look in the local cache only.
"""

from __future__ import annotations

import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 5.0  # a reachable Hub answers well within this; an unreachable one fails fast


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One quick HEAD request to ``url``: any HTTP answer means reachable; none means not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered (even 401/404/5xx): the network works
    except (urllib.error.URLError, OSError, ValueError):
        return False
