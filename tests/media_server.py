"""A local HTTP server for media-fetch tests, on 127.0.0.1 and a free port, with paths that
misbehave in the ways a remote media host can."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MediaHandler(BaseHTTPRequestHandler):
    # Set per server: the image bytes served at /image.png.
    image = b""

    def do_GET(self) -> None:
        if self.path == "/image.png":
            self._send(200, self.image, {"Content-Length": str(len(self.image))})
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "/image.png", "Content-Length": "0"})
        elif self.path == "/missing":
            self._send(404, b"no", {"Content-Length": "2"})
        elif self.path == "/big-declared":
            self._send(200, b"", {"Content-Length": str(10**9)})
        elif self.path == "/big-undeclared":
            # No Content-Length: the body ends when the connection closes; we send far more
            # than any limit the tests set, and stop once the client hangs up.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):  # a byte every 0.2 s: each read is quick, the whole is not
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            self._send(404, b"", {"Content-Length": "0"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output quiet


@contextmanager
def media_server(image: bytes) -> Iterator[str]:
    """Serve `image` at /image.png (and the misbehaving paths); yields http://127.0.0.1:PORT."""
    handler = type("Handler", (MediaHandler,), {"image": image})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="media-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
