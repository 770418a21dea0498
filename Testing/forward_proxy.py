"""An HTTP proxy on loopback, as a hospital's: CONNECT tunnels for https:// and forwarding for http://.

It resolves names only through the hosts it was given (the client never resolves them: a name that reaches
a server went through here), may require Basic credentials (407 otherwise) or forbid hosts by policy (403), and
records what it relayed.
"""

import base64
import http.client
import selectors
import socket
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from loopback import LoopbackServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailers",
              "transfer-encoding", "upgrade"}


class ForwardProxy:
    def __init__(self, hosts: dict, credentials: tuple = None, forbidden=()):
        self.tunnels = []  # "host:port" per CONNECT tunnel opened
        self.forwarded = []  # "METHOD url" per request forwarded
        self.refused = []  # the status of each request refused (407: credentials; 403: forbidden; 502: unknown host)
        self.relayed = 0  # bytes from servers to the client
        expected = credentials and "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _refuse(self, status: int, extra=()):
                proxy.refused.append(status)
                self.send_response(status)
                for name, value in extra:
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _allowed(self) -> bool:
                if expected and self.headers.get("Proxy-Authorization") != expected:
                    self._refuse(407, [("Proxy-Authenticate", 'Basic realm="hospital"')])
                    return False
                return True

            def _upstream(self, host: str, port: int):
                if host in forbidden or host not in hosts:
                    self._refuse(403 if host in forbidden else 502)
                    return None
                return hosts[host], port

            def do_CONNECT(self):
                host, _, port = self.path.rpartition(":")
                address = self._allowed() and self._upstream(host, int(port))
                if not address:
                    return
                server = socket.create_connection(address)
                proxy.tunnels.append(self.path)
                self.send_response(200, "Connection established")
                self.end_headers()
                self.close_connection = True
                self._relay(self.connection, server)

            def _relay(self, client, server):
                with selectors.DefaultSelector() as selector, server:
                    selector.register(client, selectors.EVENT_READ, server)
                    selector.register(server, selectors.EVENT_READ, client)
                    while True:
                        for key, _ in selector.select():
                            try:
                                data = key.fileobj.recv(1 << 16)
                                if data:
                                    key.data.sendall(data)
                            except OSError:
                                return
                            if not data:
                                return
                            if key.fileobj is server:
                                proxy.relayed += len(data)

            def _forward(self):
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                address = self._allowed() and self._upstream(url.hostname, url.port or 80)
                if not address:
                    return
                proxy.forwarded.append(f"{self.command} {self.path}")
                server = http.client.HTTPConnection(*address, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                try:
                    server.request(self.command, url.path + (f"?{url.query}" if url.query else ""), body, headers)
                    answer = server.getresponse()
                    self.send_response(answer.status, answer.reason)
                    for name, value in answer.getheaders():
                        if name.lower() not in HOP_BY_HOP:
                            self.send_header(name, value)
                    if answer.getheader("Content-Length") is None:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    while block := answer.read(1 << 16):
                        self.wfile.write(block)
                        proxy.relayed += len(block)
                except OSError:  # the client gave up (as on an answer too large), or the server did
                    self.close_connection = True
                finally:
                    server.close()

            do_GET = do_POST = _forward

        self.server = LoopbackServer(Handler)
        self.port = self.server.port

    def close(self):
        self.server.close()
