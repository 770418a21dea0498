"""RunPod's proxy for a pod whose services run for real on loopback: {url}/{pod_id}-{port}/... goes to the local
service routed for that pod and port (the upstream nnInteractive server, the pod agent), and anything else to the
fake RunPod's own stand-ins, which answer while a pod is being started."""

import http.client
from urllib.parse import urlsplit

from loopback import LoopbackServer, QuietHandler

NOT_PASSED_BACK = ("content-length", "transfer-encoding", "connection", "date", "server")  # the proxy's own


class PodProxy:
    def __init__(self, fake):
        self.fake = fake
        self.routes = {}  # (pod id, port) -> local port
        proxy = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the upstream client expects

            def _any(self):
                target, _, rest = self.path.lstrip("/").partition("/")
                pod_id, _, port = target.rpartition("-")
                local = proxy.routes.get((pod_id, int(port)))
                address, path = (("127.0.0.1", local), f"/{rest}") if local else (
                    (urlsplit(fake.url).hostname, urlsplit(fake.url).port), f"/proxy/{target}/{rest}")
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                upstream = http.client.HTTPConnection(*address, timeout=60)
                try:
                    upstream.request(self.command, path, body=body, headers={
                        k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")})
                    answer = upstream.getresponse()
                    data = answer.read()
                except OSError:  # nothing listens there (any more): what RunPod's proxy answers
                    answer, data = None, b"<html><body>502 Bad Gateway</body></html>"
                finally:
                    upstream.close()
                passed = [(n, v) for n, v in (answer.getheaders() if answer else ()) if n.lower() not in NOT_PASSED_BACK]
                self.reply(answer.status if answer else 502, data, passed)

            do_GET = do_POST = _any

        self.serving = LoopbackServer(Handler)
        self.url = self.serving.url

    def template(self) -> str:
        """For SM_RUNPOD_PROXY_URL: https://{pod_id}-{port}.proxy.runpod.net, here as a path."""
        return self.url + "/{pod_id}-{port}"

    def route(self, pod_id: str, port: int, local_port: int):
        self.routes[(pod_id, port)] = local_port

    def close(self):
        self.serving.close()
