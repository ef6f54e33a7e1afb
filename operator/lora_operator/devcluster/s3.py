"""An S3-compatible server (moto) on loopback, for `lora-operator dev up`, `make demo` and the tests.

moto is a dev dependency (`pip install -e .[dev]`), imported only when a server is started.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger(__name__)

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""moto accepts any credentials; these are what the dev cluster and tests hand to trainer pods."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_s3_server(host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> tuple[Any, str]:
    """Start moto's S3 server in a daemon thread; returns (server, endpoint URL). `server.stop()` ends it.

    Port 0 picks a free port. State lives in this process, so it is lost when the process exits.
    `quiet` silences werkzeug's one-line-per-request access log.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise RuntimeError("the dev S3 server needs moto: pip install -e '.[dev]'") from exc
    if quiet:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    _, bound_port = server.get_host_and_port()  # the socket is listening once start() returns
    url = f"http://{host}:{bound_port}"
    log.info("S3 server (moto) listening on %s", url)
    return server, url
