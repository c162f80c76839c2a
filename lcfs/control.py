"""Requests to a running daemon's plugin socket that are not Docker's.

The daemon serves two such calls next to the graphdriver protocol:
``/lcfs.Stats`` (the FUSE request counters, ``lcfs stats``) and
``/lcfs.Layers`` (the layer list, for ``lcfs layers`` while the daemon
has the device locked). Both are POST requests without a body that reply with
JSON.
"""

from __future__ import annotations

import http.client
import json
import socket

STATS_PATH = "/lcfs.Stats"
LAYERS_PATH = "/lcfs.Layers"
FETCH_TIMEOUT = 10.0
# An HTTP/2 server, such as the gRPC server on the containerd snapshotter
# socket, replies to an HTTP/1.1 request with a frame header: a 3-byte length,
# then the frame type, 0x04 for SETTINGS or 0x07 for GOAWAY (RFC 9113).
HTTP2_FRAME_TYPES = ("\x04", "\x07")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def fetch_json(socket_path: str, path: str, timeout: float = FETCH_TIMEOUT):
    """Return the JSON reply of the daemon listening on ``socket_path`` to ``path``.

    Raises OSError when the connection fails or the reply is not JSON
    with status 200.
    """
    connection = _UnixConnection(socket_path, timeout)
    try:
        connection.request("POST", path, body=b"")
        reply = connection.getresponse()
        body = reply.read()
    except http.client.BadStatusLine as error:
        if len(error.line) > 3 and error.line[3] in HTTP2_FRAME_TYPES:
            raise OSError(
                f"{socket_path} replied in HTTP/2, as the containerd snapshotter "
                "socket (--snapshotter-socket) does, and is not the daemon's plugin "
                "socket (--socket)"
            ) from error
        raise OSError(f"invalid HTTP reply: {error}") from error
    except http.client.HTTPException as error:
        raise OSError(f"invalid HTTP reply: {error}") from error
    finally:
        connection.close()
    if reply.status != 200:
        raise OSError(f"{path} failed with HTTP status {reply.status}: {body[:200]!r}")
    try:
        return json.loads(body)
    except ValueError as error:
        raise OSError(f"{path} replied with invalid JSON: {error}") from error
