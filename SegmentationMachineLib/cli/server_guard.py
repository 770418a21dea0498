"""The upstream nnInteractive server with its API key checked before a request is read.

Run as `python -m SegmentationMachineLib.cli.server_guard ARGS`, ARGS as `nninteractive-server` takes them and the key
in NN_INTERACTIVE_API_KEY, as `segmentation-machine server` runs it. Upstream checks the key in a FastAPI dependency,
which runs only once FastAPI has read and parsed the request's JSON body: a stranger's 90 MB POST took half a GB and
seconds before its 401, and four at once stalled every user's prompts. Here the key is compared first, in constant
time, and a request without it is refused unread; upstream's own check then sees only the key holder's requests.
"""

import hmac
import logging
import os
import sys

from ..core.refusals import Refusals

OPEN_PATHS = {"/healthz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}  # as upstream leaves them
REFUSED = b'{"detail":"Missing or invalid bearer token"}'


class KeyFirst:
    """ASGI: an HTTP request to anything but OPEN_PATHS needs `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": REFUSED})
                return
        await self.app(scope, receive, send)


class CountRefused(logging.Filter):
    """uvicorn's access log line of each refused request becomes a count said at most once a minute."""

    def __init__(self):
        super().__init__()
        self.refusals = Refusals(logging.getLogger("uvicorn.error"), "request(s) without the server's API key")

    def filter(self, record) -> bool:
        # uvicorn's access record: args = (client address, method, path, HTTP version, status)
        if isinstance(record.args, tuple) and len(record.args) == 5 and record.args[4] == 401:
            self.refusals.refused(str(record.args[0]).rsplit(":", 1)[0])
            return False
        return True


def main() -> int:
    import uvicorn
    from nnInteractive.inference.server import main as upstream

    key, serve = os.environ.get("NN_INTERACTIVE_API_KEY"), uvicorn.run
    # Upstream's main builds its app and hands it to uvicorn.run: it gets ours, the key checked first.
    uvicorn.run = lambda app, **options: serve(KeyFirst(app, key) if key else app, **options)
    logging.getLogger("uvicorn.access").addFilter(CountRefused())  # uvicorn's logging set-up keeps a logger's filters
    return upstream.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
