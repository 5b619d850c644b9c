"""Whether the Hugging Face hub can be reached, asked once and quickly.

Without a network, `from_pretrained` and `load_dataset` retry each file with backoff: an unknown
or uncached hub id took 48 s and printed 45 retry warnings before failing. One HEAD request to
the hub's endpoint (its own HTTP session: proxies and HF_ENDPOINT apply) with a short timeout
tells the same in well under a second, so a hub id is refused at once with what to do instead.
"""

from __future__ import annotations

import threading
from functools import lru_cache

PROBE_SECONDS = 5.0


def offline_mode() -> bool:
    """HF_HUB_OFFLINE is set: the libraries read their local cache only and fail fast."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unreachable() -> str | None:
    """Why the hub cannot be reached (None when it answers, or in offline mode, where the
    libraries never ask it)."""
    from huggingface_hub import constants

    return None if offline_mode() else _probe(constants.ENDPOINT)


@lru_cache(maxsize=8)
def _probe(endpoint: str) -> str | None:
    """One HEAD request to `endpoint`; any HTTP answer means reachable. Run in a thread so that
    a resolver that hangs (which no socket timeout bounds) costs PROBE_SECONDS at most."""
    outcome: list[str | None] = []

    def ask() -> None:
        from huggingface_hub.utils import get_session

        try:
            get_session().head(endpoint, timeout=PROBE_SECONDS)
            outcome.append(None)
        except Exception as e:  # ConnectError, timeouts, TLS, proxy errors: all "unreachable"
            outcome.append((str(e).strip().splitlines() or [type(e).__name__])[0][:200])

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(PROBE_SECONDS + 1)
    return outcome[0] if outcome else f"no answer within {PROBE_SECONDS:.0f} s"


def unreachable_hint(endpoint_error: str) -> str:
    """The part of a refusal that says why and what else works."""
    from huggingface_hub import constants

    return (f"the Hugging Face hub ({constants.ENDPOINT}) is unreachable ({endpoint_error}); "
            "without a network, set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face "
            "cache")
