"""Container health check: GET /healthz of this container's process, exit 0 when it answers 200.

The web container answers on ``$PORT``; a worker container answers on
``$MOTIONHOOK_WORKER_METRICS_PORT`` (set it for workers only). Used by the
Dockerfile's HEALTHCHECK and by compose; standard library only.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("MOTIONHOOK_WORKER_METRICS_PORT") or os.environ.get("PORT", "8000")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (OSError, urllib.error.URLError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
