"""Quick, bounded checks of the Hugging Face Hub before any download (offline mode, reachability)."""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request

#: Seconds allowed for the check that the Hugging Face Hub is reachable before any download.
HUB_CHECK_TIMEOUT = 3.0


def _hub_offline() -> bool:
    """Whether Hugging Face offline mode is on (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env and env.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _reachable(url: str, timeout: float = HUB_CHECK_TIMEOUT) -> tuple[bool, str]:
    """Whether ``url`` answers within ``timeout`` seconds (DNS included; any HTTP status counts)."""
    result: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append((True, ""))
        except urllib.error.HTTPError:
            result.append((True, ""))
        except Exception as e:  # noqa: BLE001 - any failure means unreachable
            result.append((False, f"{type(e).__name__}: {e}"))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        return False, f"no answer within {timeout:g} s"
    return result[0]
