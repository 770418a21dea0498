"""RunPod's HTTPS proxy (Cloudflare) in front of a service on loopback, as it treats requests: a body cap (413,
near 100 MB), a time limit per request (524 after 100 s), its own HTML page while the service refuses connections
(502 while a pod's server restarts), and optionally a slow uplink. Tests scale the cap and the limit down."""

import http.client
import socket
import time

from loopback import LoopbackServer, QuietHandler

DOWN_PAGE = (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title><style>body{font-family:sans-serif}</style>"
             b"</head><body><h1>502 Bad Gateway</h1><p>The origin did not answer.</p><hr><center>cloudflare</center>"
             b"</body></html>")


class CloudflareLike:
    """A reverse proxy on loopback: body cap (413), request time limit (524), an HTML page with down_status while
    the server refuses connections (RunPod's 502 while a pod's server restarts), optional slow uplink."""

    def __init__(self, upstream_port: int, cap: int = 100_000_000, limit_s: float = 100.0,
                 uplink_bytes_per_s: float = None):
        self.seen = []  # (method, path, body bytes, status) per request
        self.cap = cap  # may change while it runs: a proxy whose limit tightens
        self.down_status = 502
        proxy = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the upstream client expects

            def _any(self):
                started = time.monotonic()
                length = int(self.headers.get("Content-Length", 0))
                if length > proxy.cap:
                    self.rfile.read(length)
                    return self._reply(413, b"<html><body>413 Request Entity Too Large</body></html>", length)
                body = self._read(length, uplink_bytes_per_s)
                left = limit_s - (time.monotonic() - started)
                if left <= 0:
                    return self._reply(524, b"<html><body>524 A timeout occurred</body></html>", length)
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=left)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                except socket.timeout:
                    return self._reply(524, b"<html><body>524 A timeout occurred</body></html>", length)
                except ConnectionRefusedError:
                    return self._reply(proxy.down_status, DOWN_PAGE.replace(b"502", str(proxy.down_status).encode()),
                                       length)
                finally:
                    upstream.close()
                passed = [(k, v) for k, v in answer.getheaders()
                          if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server")]
                self._reply(answer.status, data, length, passed)

            def _read(self, length: int, rate) -> bytes:
                if rate is None:
                    return self.rfile.read(length)
                parts, chunk = [], max(1, int(rate / 20))
                while length > 0:
                    parts.append(self.rfile.read(min(chunk, length)))
                    length -= len(parts[-1])
                    time.sleep(len(parts[-1]) / rate)
                return b"".join(parts)

            def _reply(self, status: int, data: bytes, length: int, headers=()):
                proxy.seen.append((self.command, self.path, length, status))
                self.reply(status, data, headers)

            do_GET = do_POST = do_PUT = _any

        self.serving = LoopbackServer(Handler)
        self.url = self.serving.url

    def uploads(self) -> list:
        return [(length, status) for method, path, length, status in self.seen if path == "/set_image"]

    def close(self):
        self.serving.close()
