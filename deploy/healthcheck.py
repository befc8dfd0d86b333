"""Container health check: exit 0 when the service running in this container answers 200.

Usage: python healthcheck.py [PATH]   (PATH defaults to /readyz; /healthz is liveness only)

One image runs either the export service or the gateway, so the check asks both ports as the
services themselves read them (EXPORT_PORT, GATEWAY_PORT, with the code's defaults) on the
loopback address; a port nothing listens on is refused at once. Standard library only, apart from
the package's own settings classes.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

from services.common.settings import from_env
from services.export.config import ExportConfig
from services.gateway.config import GatewayConfig


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/readyz"
    ports = (
        from_env(ExportConfig, "EXPORT", os.environ).port,
        from_env(GatewayConfig, "GATEWAY", os.environ).port,
    )
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=4) as reply:
                if reply.status == 200:
                    return 0
        except urllib.error.HTTPError as exc:  # the service answers, but not ready
            print(f"127.0.0.1:{port}{path}: {exc.code}", file=sys.stderr)
            return 1
        except OSError:
            continue  # nothing listening there: the other service runs in this container
    print(f"no service answered {path} on ports {ports}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
