"""The sentences a user reads when the nnInteractive server cannot be used, from what the upstream client raised.

One translation (sentences) serves both claiming a session and each request on it: they differ only where the
same error means something else then (a transport error while connecting is an unreachable server; during a
request, a broken connection). The sentences name the server's address, never its key.
"""

import contextlib

from ..core.errors import UserError, untrusted_certificate

# What the upstream client says of a 503 whose body has no JSON detail: a proxy's page, never the server's own
# "server is at capacity (N sessions)" (nninteractive-client 2.6, remote_session._raise_for_lease_errors).
CAPACITY_WITHOUT_DETAIL = "server is at capacity"
# After a CUDA out of memory upstream's server is about half as fast on large structures until it restarts; ours
# restarts it.
RESTARTS = ("a pod's server, or one run by segmentation-machine server, restarts itself within a minute; another is "
            "about half as fast on large structures until restarted")
# When an error happened: what it means differs between claiming a session (first, or after a lost one) and using it.
CONNECT, RESUME, REQUEST = "connect", "resume", "request"


class InteractiveError(UserError):
    """The nnInteractive server cannot be used (unreachable, key rejected, full, incompatible)."""


class NoSession(Exception):
    """The session has no server session: the last one was lost and could not be resumed."""


@contextlib.contextmanager
def sentences(session, phase: str):
    """Turns what the upstream client raises inside into the InteractiveError the user reads (session: its url,
    read_timeout_s, capabilities and region_note name the server and the prompt); anything else passes as it is.
    A full server that said so passes while connecting: the caller waits for a free session."""
    try:
        yield
    except Exception as error:
        sentence = _sentence(session, error, phase)
        if sentence is None:
            raise
        raise sentence from None


def _sentence(session, error: Exception, phase: str):
    """The InteractiveError for error, raised in phase (CONNECT, RESUME or REQUEST); None where it has none."""
    import httpx
    from nnInteractive.inference.remote import remote_session

    from . import remote

    if isinstance(error, remote_session.ServerAtCapacityError):
        # The upstream client's name for any 503: once claimed, or without upstream's JSON, only a proxy's.
        return _gateway(session, 503) if phase == REQUEST or str(error) == CAPACITY_WITHOUT_DETAIL else None
    if isinstance(error, httpx.HTTPStatusError):
        return http_error(session, error)
    if isinstance(error, (remote.AnswerRefused, httpx.ReadTimeout)):
        return _unanswered(session, error)
    if isinstance(error, remote.RequestTooLarge):
        return InteractiveError(f"This client refused to send {error} one request may carry through the proxy; "
                                "the segment is left as it was: use a smaller prompt.")
    if isinstance(error, KeyError) and phase != REQUEST:  # a reply without the fields this client version expects
        return InteractiveError(f"The server at {session.url} speaks another nnInteractive protocol (missing "
                                f"{error}); this client is nninteractive-client "
                                f"{_client_version()}: run server and client of the same version.")
    if isinstance(error, (ValueError, KeyError, TypeError, AttributeError)):  # not JSON, or JSON of another shape
        return bad_reply(session, str(error) if isinstance(error, remote.BadReply) else error)
    if isinstance(error, remote.ProxyFailed):
        return InteractiveError(f"Cannot reach the nnInteractive server at {session.url}: {error}.")
    if isinstance(error, NoSession):  # only a cancelled prompt's thread, which leaves the session alone, gets here
        return InteractiveError("The prompt was cancelled.")
    if isinstance(error, httpx.TransportError):
        return _transport_error(session, error, phase)
    return None


def _transport_error(session, error: Exception, phase: str) -> InteractiveError:
    if phase == REQUEST:
        return InteractiveError(f"The connection to the nnInteractive server at {session.url} failed during the "
                                f"request ({type(error).__name__}); the segment is left as it was: "
                                "prompt again to continue.")
    if untrusted_certificate(error):
        return InteractiveError(
            f"The nnInteractive server at {session.url} shows a certificate this computer does not trust "
            f"({untrusted_certificate(error)}): check the address; behind a proxy that inspects TLS, set "
            "REQUESTS_CA_BUNDLE to your organisation's CA certificates.")
    if phase == RESUME:  # it answered before: gone since, or restarting (as after a GPU out of memory)
        return InteractiveError(f"The nnInteractive server at {session.url} stopped answering "
                                f"({type(error).__name__}); the segment is left as it was: it may be "
                                "restarting, so prompt again in a minute, else check that it runs.")
    return InteractiveError(f"Cannot reach the nnInteractive server at {session.url} "
                            f"({type(error).__name__}): check the URL and that the server is running.")


def bad_reply(session, error) -> InteractiveError:
    """A reply this client cannot read: a broken or foreign server, never written into the segment."""
    detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return InteractiveError(f"The server at {session.url} sent a reply this client cannot read ({detail}); "
                            "nothing was written to the segment: check that it is an nnInteractive server "
                            f"for nninteractive-client {_client_version()}.")


def http_error(session, error) -> InteractiveError:
    from . import remote

    code = error.response.status_code
    if code == 401:
        return InteractiveError(f"The nnInteractive server at {session.url} rejected the API key: "
                                "enter the key the server was started with.")
    if code == 413:  # Cloudflare's answer to a body over its cap
        return InteractiveError(f"The proxy in front of {session.url} refused a request as too large (HTTP 413); "
                                "the segment is left as it was: use a smaller prompt, or reach the server "
                                "without the proxy.")
    if code == 524:  # Cloudflare in front of RunPod's proxy ends a request after 100 s
        return InteractiveError(f"The proxy in front of {session.url} gave up waiting for the prediction (HTTP 524, "
                                "after about 100 s); the segment is left as it was: try a smaller prompt, "
                                "or reach the server without the proxy.")
    if code in (404, 405, 422):
        return InteractiveError(f"The server at {session.url} does not understand this client "
                                f"(HTTP {code}; client nninteractive-client {_client_version()}, server "
                                f"{session.capabilities.server_version if session.capabilities else 'unknown'}): "
                                "run server and client of the same version.")
    if code in (502, 503, 504):
        return _gateway(session, code)
    said = remote.error_text(error.response)
    if code == 400 and "entirely zero" in said:  # upstream cannot normalise it: an MR's air, a blank volume
        return InteractiveError(f"The part of the scan sent for this prompt is all zero ({session.region_note}), "
                                "which nnInteractive cannot segment; the segment is left as it was: place the "
                                "prompt on the structure, or choose the scan's own volume.")
    if code == 400:
        return InteractiveError(f"The nnInteractive server refused this prompt (HTTP 400: {said}); the segment "
                                "is left as it was: place the prompt inside the scan, or reset the segment and "
                                "try again.")
    if code == 500 and "out of memory" in said.lower():
        return InteractiveError(f"The nnInteractive server ran out of GPU memory on this prompt (HTTP 500: "
                                f"{said}); the segment is left as it was: the GPU has too little memory for this "
                                f"region and prompt, so run the server on a GPU with more memory ({RESTARTS}).")
    if code == 500:  # upstream answers only this to what it does not expect, a CUDA out of memory included
        return InteractiveError(f"The nnInteractive server failed on this prompt (HTTP 500: {said}); the segment "
                                "is left as it was: its log says why (a pod's logs are in RunPod's console); "
                                "where that is CUDA out of memory, run the server on a GPU with more memory "
                                f"({RESTARTS}); otherwise try the prompt again.")
    return InteractiveError(f"The nnInteractive server answered HTTP {code} ({said}): try the prompt again, "
                            "or reset the segment.")


def _gateway(session, code: int) -> InteractiveError:
    """RunPod's proxy (Cloudflare) answers these, with an HTML page, while the pod's server starts or restarts."""
    return InteractiveError(f"The nnInteractive server at {session.url} is starting, restarting or unreachable "
                            f"through the proxy in front of it (HTTP {code}); the segment is left as it was: "
                            "wait a minute and try again.")


def _unanswered(session, error) -> InteractiveError:
    from . import remote

    if isinstance(error, remote.AnswerRefused):
        return InteractiveError(f"The server at {session.url} sent {error}; the segment is left as it was: "
                                "check that the address is your nnInteractive server.")
    return InteractiveError(f"The nnInteractive server has not answered within {session.read_timeout_s:g} s "
                            "(a large structure can take that long); the segment is left as it was: "
                            "prompt again to continue.")


def _client_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nninteractive-client")
    except PackageNotFoundError:
        return "unknown"
