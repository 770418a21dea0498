"""The one translation of what the upstream client raises into the sentence the user reads (prompts/errors.py), used
by claiming a session and by each request alike: where the same error means another thing while connecting, while
resuming a lost session and during a request, each gets its own sentence; what it does not know passes unchanged."""

import httpx
import pytest
from nnInteractive.inference.remote.remote_session import ServerAtCapacityError

from SegmentationMachineLib.prompts import errors
from SegmentationMachineLib.prompts.session import InteractiveError, InteractiveSession

URL = "https://pod-8000.proxy.runpod.net"


def sentence(error: Exception, phase: str) -> str:
    with pytest.raises(InteractiveError) as raised, errors.sentences(InteractiveSession(URL, "a-key"), phase):
        raise error
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no traceback behind the sentence
    return str(raised.value)


def test_a_refused_connection_is_unreachable_when_connecting_restarting_when_resuming_and_broken_in_a_request():
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    assert sentence(refused, errors.CONNECT) == (f"Cannot reach the nnInteractive server at {URL} (ConnectError): "
                                                 "check the URL and that the server is running.")
    assert sentence(refused, errors.RESUME).startswith(f"The nnInteractive server at {URL} stopped answering "
                                                       "(ConnectError); the segment is left as it was: it may be "
                                                       "restarting")
    assert sentence(refused, errors.REQUEST).startswith(f"The connection to the nnInteractive server at {URL} failed "
                                                        "during the request (ConnectError)")


def test_a_reply_missing_a_field_is_another_protocol_when_claiming_and_an_unreadable_reply_later():
    for phase in (errors.CONNECT, errors.RESUME):
        assert sentence(KeyError("lease_token"), phase).startswith(
            f"The server at {URL} speaks another nnInteractive protocol (missing 'lease_token'); this client is "
            "nninteractive-client ")
    assert sentence(KeyError("bbox"), errors.REQUEST).startswith(
        f"The server at {URL} sent a reply this client cannot read (KeyError: 'bbox'); nothing was written")


def test_a_full_server_is_waited_for_only_while_connecting_and_only_when_it_says_so_itself():
    said_so = ServerAtCapacityError("server is at capacity (4 sessions)")  # upstream's JSON detail: the server's own
    for phase in (errors.CONNECT, errors.RESUME):
        with pytest.raises(ServerAtCapacityError) as passed, errors.sentences(InteractiveSession(URL, "k"), phase):
            raise said_so
        assert passed.value is said_so  # the session waits for a free one
    proxy_page = ServerAtCapacityError(errors.CAPACITY_WITHOUT_DETAIL)  # a 503 without it: a proxy's HTML page
    gateway = (f"The nnInteractive server at {URL} is starting, restarting or unreachable through the proxy in front "
               "of it (HTTP 503)")
    assert sentence(proxy_page, errors.CONNECT).startswith(gateway)
    assert sentence(said_so, errors.REQUEST).startswith(gateway)  # once claimed, any 503 is a proxy's


def test_an_error_it_has_no_sentence_for_passes_unchanged():
    for unknown in (RuntimeError("a bug of ours"), InteractiveError("A sentence already.")):
        with pytest.raises(type(unknown)) as passed, errors.sentences(InteractiveSession(URL, "k"), errors.REQUEST):
            raise unknown
        assert passed.value is unknown


def test_a_request_the_server_cannot_parse_is_a_version_mismatch_whatever_its_code():
    """FastAPI answers a body of another protocol version with 422 (a path it lacks with 404, a method with 405):
    each is the client and server versions apart, not a refused prompt."""
    for code in (404, 405, 422):
        request = httpx.Request("POST", f"{URL}/add_point_interaction")
        refused = httpx.HTTPStatusError(f"{code}", request=request, response=httpx.Response(code, request=request))
        assert sentence(refused, errors.REQUEST).startswith(
            f"The server at {URL} does not understand this client (HTTP {code}; client nninteractive-client "), code
