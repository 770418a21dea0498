"""The upstream nnInteractive client (nninteractive-client 2.6), made to trust no reply.

The server may be anything the user typed a URL for. Every prediction reply is checked before a
voxel is written: the changed box against the target buffer (a wrong one makes VTK read out of
bounds), the diff's dtype, shape and size (the upstream client would build an "object" array
from the server's bytes and dereference them). Every answer must arrive whole within its read
time-out and under a size cap: httpx's time-out is per read, so a server dripping a byte every
few seconds would hold us for ever, and a multi-GB answer would be read into memory. A proxy from the
environment (proxies.py: a hospital's) is gone through on the same guarded connections.
Imported only where the client is installed (the base install runs without it).
"""

import html
import json
import os
import re
import ssl
import struct
import threading
import time

import httpcore
import httpx
import numpy as np
from nnInteractive.inference.remote import remote_session
from nnInteractive.inference.remote._protocol import META_HEADER
from nnInteractive.inference.remote.serialization import pack_array, unpack_array

from ..core.files import printable
from .proxies import proxy_for, ProxySettingError

PLAIN_NUMBERS = "biuf"  # numpy kinds a diff may have: bool, signed and unsigned integers, floats
SMALL_ANSWER = 1 << 20  # JSON replies, headers and a packed diff's overhead
# Upstream's server (uvicorn) closes a connection idle for 5 s: one kept as long meets a closed socket when a prompt
# goes out within a round trip of that (a tunnel, a server on the network). Closed sooner, it is never reused then.
KEEPALIVE_S = 3.0


class BadReply(ValueError):
    """A reply that breaks the protocol; the message says how."""


class RequestTooLarge(Exception):
    """A request body larger than the session may send (the proxy's cap): refused before sending."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"a request of {size / 1e6:.1f} MB, over the {limit / 1e6:.1f} MB limit")
        self.size, self.limit = size, limit


class ProxyFailed(httpx.TransportError):
    """The proxy from the environment cannot be used, or refused; the message names it (never its credentials)
    and says what to do. An httpx error, so the upstream client's own handlers take it as one."""


class AnswerRefused(httpx.ReadError):
    """An answer not read whole: larger than any answer can be, or compressed although we asked for none.
    An httpx error, so the upstream client's own handlers (release at close, heartbeat) take it as one."""


def short(value, limit: int = 80) -> str:
    """A value the server sent, for a message: cut to limit, control characters escaped."""
    text = value if isinstance(value, str) else repr(value)
    return printable(text if len(text) <= limit else text[:limit] + "...")


def error_text(response: httpx.Response) -> str:
    """What an error answer says, for a message: upstream's JSON detail, or its text without markup (a proxy's HTML
    page), cut to 200 characters."""
    try:
        text = response.json().get("detail")
    except (ValueError, AttributeError):
        text = None
    if not isinstance(text, str):
        text = html.unescape(re.sub(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", " ", response.text, flags=re.S | re.I))
    return short(" ".join(text.split()), 200) or "no text"


class _AnswerGuard(httpcore.SyncBackend):
    """Every byte read from the server passes here. Per request (per thread: the heartbeat's requests are
    its own): the whole answer within the request's read time-out, counted from the first byte awaited, and
    no more than limit() bytes. Every connection is made here too: through a proxy, a TCP connection is to the proxy."""

    def __init__(self, limit):
        self.limit = limit
        self._request = threading.local()

    def begin(self, seconds):
        self._request.seconds, self._request.deadline, self._request.received = seconds, None, 0
        self._request.connecting = False

    def connect_tcp(self, *args, **kwargs):
        self._request.connecting = True  # until the TCP connection stands (to the proxy, where there is one)
        stream = super().connect_tcp(*args, **kwargs)
        self._request.connecting = False
        return _GuardedStream(stream, self)

    def failed_connecting(self) -> bool:
        """Whether this thread's request failed making a TCP connection, rather than later (in TLS, say)."""
        return self._request.connecting

    def read(self, stream, max_bytes: int, timeout):
        request, now = self._request, time.monotonic()
        if request.deadline is None:  # the request has been sent; its answer is awaited from now
            request.deadline = now + (request.seconds if request.seconds is not None else float("inf"))
        left = request.deadline - now
        if left <= 0:
            raise httpcore.ReadTimeout(f"the answer was not complete within {request.seconds:g} s")
        data = stream.read(max_bytes, left if timeout is None else min(timeout, left))
        request.received += len(data)
        if request.received > self.limit():
            raise AnswerRefused(f"an answer larger than {self.limit() / 1e6:.1f} MB (no answer for this volume "
                                "can be that large)")
        return data


class _GuardedStream(httpcore.NetworkStream):
    def __init__(self, stream, guard: _AnswerGuard):
        self._stream, self._guard = stream, guard

    def read(self, max_bytes: int, timeout=None) -> bytes:
        return self._guard.read(self._stream, max_bytes, timeout)

    def write(self, buffer: bytes, timeout=None):
        self._stream.write(buffer, timeout)

    def close(self):
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _GuardedStream(self._stream.start_tls(ssl_context, server_hostname, timeout), self._guard)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


def _ssl_context():
    """httpx's (certifi's CAs, or SSL_CERT_FILE's), but REQUESTS_CA_BUNDLE's first, as for the RunPod and DICOMweb
    calls: Slicer's launcher sets SSL_CERT_FILE to Slicer's own bundle whatever the user set."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE")
    return ssl.create_default_context(cafile=bundle) if bundle and os.path.isfile(bundle) else httpx.create_ssl_context()


class _GuardedTransport(httpx.HTTPTransport):
    def __init__(self, guard: _AnswerGuard, proxy=None):
        super().__init__()
        # httpx takes no network backend: its connection pool, or its proxy (which httpx would give a transport
        # of its own), is made again with ours (httpx 0.28).
        options = dict(ssl_context=_ssl_context(), keepalive_expiry=KEEPALIVE_S, network_backend=guard)
        if proxy is None:
            self._pool = httpcore.ConnectionPool(**options)
        else:  # an https:// server through CONNECT, an http:// one by forwarding
            self._pool = httpcore.HTTPProxy(httpcore.URL(scheme=proxy.scheme.encode(), host=proxy.host.encode(),
                                                         port=proxy.port, target=b"/"),
                                            proxy_auth=proxy.auth, **options)
        self._guard, self._proxy = guard, proxy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self._guard.begin(request.extensions.get("timeout", {}).get("read"))
        url = request.url
        try:
            response = super().handle_request(request)
        except httpx.ProxyError as error:  # its answer to CONNECT; httpcore says "407 Proxy Authentication Required"
            if self._proxy is None:
                raise
            status, _, reason = str(error).partition(" ")
            raise ProxyFailed(self._proxy.refused(int(status), short(reason, 40), url.host, url.port)) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            if self._proxy is None or not self._guard.failed_connecting():  # TLS with the server, say
                raise
            raise ProxyFailed(self._proxy.unreachable(type(error).__name__, url.host)) from None
        if response.status_code == 407 and self._proxy is not None:  # a forwarded request's answer
            response.close()
            raise ProxyFailed(self._proxy.refused(407, short(response.reason_phrase, 40), url.host, url.port))
        encoding = response.headers.get("Content-Encoding", "identity")
        if encoding != "identity":  # httpx would inflate it, past the size cap (a compression bomb)
            response.close()
            raise AnswerRefused(f"a {short(encoding)}-compressed answer, which this client did not ask for")
        return response


class GuardedSession(remote_session.nnInteractiveRemoteInferenceSession):
    """The upstream remote session over the guarded transport, with every prediction reply checked."""

    def __init__(self, url: str, api_key: str, read_timeout: float, max_request_bytes: int = None):
        try:
            self._proxy = proxy_for(url)
        except ProxySettingError as error:
            raise ProxyFailed(str(error)) from None
        self._guard = _AnswerGuard(self._answer_limit)
        self.max_request_bytes, self.last_sent = max_request_bytes, 0
        super().__init__(url, api_key=api_key, read_timeout=read_timeout)

    def _post_binary(self, path, meta, array_bytes, timeout=None):
        """As upstream, but a body over max_request_bytes is refused here: the proxy would answer 413."""
        if self.max_request_bytes is not None and len(array_bytes) > self.max_request_bytes:
            raise RequestTooLarge(len(array_bytes), self.max_request_bytes)
        self.last_sent = len(array_bytes)
        return super()._post_binary(path, meta, array_bytes, timeout)

    def _answer_limit(self) -> int:
        """A packed diff is never much larger than the raw target buffer it updates."""
        buffer = self.__dict__.get("target_buffer")
        return SMALL_ANSWER + (0 if buffer is None else buffer.nbytes)

    # The upstream constructor makes its httpx client and claims a lease at once: the client is swapped
    # here, as it is assigned, for one on the guarded transport, through the proxy the environment names (proxies.py)
    # rather than httpx's choice: httpx would give it a transport of its own, unguarded.
    @property
    def _http(self) -> httpx.Client:
        return self.__dict__["_http"]

    @_http.setter
    def _http(self, client: httpx.Client):
        headers = client.headers.copy()
        headers["Accept-Encoding"] = "identity"
        client.close()
        self.__dict__["_http"] = httpx.Client(base_url=client.base_url, timeout=client.timeout, headers=headers,
                                              transport=_GuardedTransport(self._guard, self._proxy), trust_env=False)

    def _apply_prediction_response(self, resp: httpx.Response) -> bool:
        """As upstream, but the box and the diff are checked before anything is written."""
        self._last_paste_bbox = None
        meta = _meta(resp)
        ran = meta.get("ran_prediction", False) is True
        bbox = meta.get("bbox")
        if not ran or bbox is None or self.target_buffer is None:
            return ran
        box = checked_box(bbox, self.target_buffer.shape)
        self._write_bbox_into_target_buffer(checked_diff(resp.content, box, self.target_buffer), box)
        self._last_paste_bbox = box
        return ran


def pack_image(image: np.ndarray) -> bytes:
    """An image as the upstream client's set_image packs it (to know its size on the wire)."""
    return pack_array(image, nthreads=remote_session._compression_threads())


def _meta(resp: httpx.Response) -> dict:
    raw = resp.headers.get(META_HEADER)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise BadReply(f"its {META_HEADER} header is not JSON") from None
    if not isinstance(meta, dict):
        raise BadReply(f"its {META_HEADER} header is not a JSON object")
    return meta


def checked_box(bbox, shape) -> list:
    """bbox as [[lo, hi]] per axis of shape, or BadReply unless every pair is integers with 0 <= lo < hi <= size."""
    pairs = isinstance(bbox, list) and len(bbox) == len(shape) and all(
        isinstance(pair, list) and len(pair) == 2 and all(type(v) is int for v in pair) for pair in bbox)
    if not pairs:
        raise BadReply(f"its changed box {short(bbox)} is not {len(shape)} pairs of integers")
    if not all(0 <= lo < hi <= size for (lo, hi), size in zip(bbox, shape)):
        raise BadReply(f"its changed box {short(bbox)} is reversed, empty or outside the "
                       f"{'x'.join(map(str, shape))} volume")
    return bbox


def checked_diff(body: bytes, box: list, buffer: np.ndarray) -> np.ndarray:
    """The packed diff (the upstream wire format), unpacked only once its header declares plain numbers of
    exactly the box's shape, no larger than the buffer: numpy would otherwise make an array of whatever
    dtype and size the server names."""
    try:
        ndim, name_length = struct.unpack_from("<BB", body, 6)
        name = body[8:8 + name_length].decode("ascii")
        shape = struct.unpack_from(f"<{ndim}q", body, 8 + name_length)
        dtype = np.dtype(name)
    except (struct.error, UnicodeDecodeError, TypeError, ValueError):
        raise BadReply("its voxels are not a packed array") from None
    if dtype.kind not in PLAIN_NUMBERS or dtype.hasobject:
        raise BadReply(f"its voxels are of type {short(name)}, not plain numbers")
    wanted = tuple(hi - lo for lo, hi in box)
    if shape != wanted:
        raise BadReply(f"its voxels have shape {short(shape)}, not the changed box's {wanted}")
    if int(np.prod(wanted)) * dtype.itemsize > buffer.nbytes:
        raise BadReply(f"its voxels ({dtype.name}) are larger than the segment they update")
    try:
        return unpack_array(body)
    except (ValueError, RuntimeError, struct.error) as error:  # blosc2 raises RuntimeError on a bad frame
        raise BadReply(f"its voxels cannot be unpacked ({short(str(error))})") from None
