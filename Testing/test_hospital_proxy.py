"""AI prompts through the proxy a hospital forces (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY), every guard kept.

The proxy (forward_proxy.py) is a real one on loopback: CONNECT tunnels for https://, forwarding for http://.
The server is the hostile fake of test_hostile_server.py, over TLS (a certificate for nninteractive.test, trusted
through SSL_CERT_FILE) and plain: only the proxy knows where nninteractive.test is, so a session that reaches it
went through the proxy, and one that goes direct cannot.
"""

import base64
import logging
import os
import time
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
import requests.utils

from certificates import self_signed
from forward_proxy import ForwardProxy
from loopback import LoopbackServer
from nninteractive_server import free_port
from test_hostile_server import DRIP_EVERY_S, Hostile, READ_TIMEOUT_S, SHAPE
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.prompts.promptfile import Prompt
from SegmentationMachineLib.prompts.proxies import proxy_for, ProxySettingError
from SegmentationMachineLib.prompts.session import headless_editor, InteractiveSession, SegmentTarget

NAME = "nninteractive.test"  # resolvable by the proxy only
USER, PASSWORD = "ward7", "s3cret p@ss:w/rd"  # characters that must be percent-encoded in a proxy URL
TOO_LARGE = "sent an answer larger than 1.1 MB (no answer for this volume can be that large)"
UNTRUSTED = ("The nnInteractive server at {url} shows a certificate this computer does not trust (self-signed "
             "certificate): check the address; behind a proxy that inspects TLS, set REQUESTS_CA_BUNDLE to your "
             "organisation's CA certificates.")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{scheme: port} of the fake server on loopback, over TLS and plain; SSL_CERT_FILE: its certificate."""
    tls = self_signed(tmp_path_factory.mktemp("tls"), "server", NAME)
    with LoopbackServer(Hostile) as plain, LoopbackServer(Hostile, tls) as secure:
        yield {"http": plain.port, "https": secure.port}, str(tls[0])


@pytest.fixture
def env(monkeypatch, servers):
    """No proxy setting but the test's, and loopback in NO_PROXY as for the whole run (nninteractive_server.py):
    other tests' threads still talking to 127.0.0.1 through requests must not wander into the test's proxy. The
    fake server's certificate trusted."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SSL_CERT_FILE", servers[1])
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)  # it comes first: a machine's own would hide ours
    return monkeypatch


@pytest.fixture
def proxies(servers):
    made = []
    yield lambda **options: made.append(ForwardProxy({NAME: "127.0.0.1"}, **options)) or made[-1]
    for proxy in made:
        proxy.close()


def url_of(servers, scheme: str, fault: str = "honest", host: str = NAME) -> str:
    return f"{scheme}://{host}:{servers[0][scheme]}/{fault}"


def prompt(ctx, url: str, said: list = None):
    """(the error sentence or None, voxels set) of a session that connects to url and prompts one point."""
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
    arrays.set_volume_array(volume, np.zeros(SHAPE, np.int16), np.eye(4))
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("", "target")
    session = InteractiveSession(url, "key", status=(said if said is not None else []).append,
                                 read_timeout_s=READ_TIMEOUT_S)
    error = None
    try:
        session.connect()
        session.set_volume(volume)
        session.select_segment(SegmentTarget(segmentation, target, headless_editor(ctx.scene, ctx.app_logic,
                                                                                   segmentation, volume)))
        session.add(Prompt("point", True, ras=(13.0, 11.0, 9.0)))  # the fake's honest answer: 27 voxels
    except UserError as failure:
        error = str(failure)
    voxels = int(session._segment_mask(target).sum()) if session._target is not None else 0
    session.close()
    return error, voxels


def test_prompts_go_through_the_proxy_the_environment_names(ctx, env, servers, proxies):
    proxy = proxies()
    env.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")  # either case
    env.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.port}")  # host:port alone means http://
    assert prompt(ctx, url_of(servers, "https")) == (None, 27)
    assert proxy.tunnels and set(proxy.tunnels) == {f"{NAME}:{servers[0]['https']}"} and proxy.forwarded == []
    tunnelled = proxy.relayed

    plain, said = url_of(servers, "http"), []
    assert prompt(ctx, plain, said) == (None, 27)
    assert {f"POST {plain}/claim", f"POST {plain}/set_image", f"POST {plain}/add_point_interaction"} <= \
        set(proxy.forwarded)
    assert proxy.relayed > tunnelled and proxy.refused == []
    assert said == [f"Warning: {NAME} is reached over plain http://, so the API key and the image travel unencrypted: "
                    "use its https:// address (a pod's proxy URL) or an SSH tunnel."]


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_an_answer_too_large_or_too_slow_is_cut_off_through_the_proxy_too(ctx, env, servers, proxies, scheme):
    proxy = proxies()
    env.setenv(f"{scheme.upper()}_PROXY", f"http://127.0.0.1:{proxy.port}")
    huge = url_of(servers, scheme, "huge")  # 4 GiB announced, sent as fast as it is read
    assert prompt(ctx, huge) == (f"The server at {huge} {TOO_LARGE}; the segment is left as it was: check that the "
                                 "address is your nnInteractive server.", 0)
    assert proxy.relayed < 16 << 20  # the client stopped reading, and closed the connection, at the cap
    started = time.monotonic()
    error, voxels = prompt(ctx, url_of(servers, scheme, "drip-body"))  # a byte every 0.5 s: only the deadline ends it
    assert error.startswith(f"The nnInteractive server has not answered within {READ_TIMEOUT_S:g} s") and voxels == 0
    assert time.monotonic() - started < READ_TIMEOUT_S + 3 * DRIP_EVERY_S + 2  # not the drip's 14 hours
    if scheme == "https":
        assert len(proxy.tunnels) >= 2  # a session each
    else:
        assert {f"POST {url_of(servers, scheme, fault)}/add_point_interaction" for fault in ("huge", "drip-body")} \
            <= set(proxy.forwarded)


def test_no_proxy_and_loopback_addresses_go_direct(ctx, env, servers, proxies):
    proxy = proxies()
    env.delenv("NO_PROXY")  # loopback goes direct by our rule alone
    env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    env.setenv("ALL_PROXY", f"http://127.0.0.1:{proxy.port}")
    for host in ("127.0.0.1", "localhost"):  # an SSH tunnel: on this computer, which the proxy cannot reach
        assert prompt(ctx, url_of(servers, "http", host=host)) == (None, 27)
    assert proxy.tunnels == proxy.forwarded == []
    assert prompt(ctx, url_of(servers, "https")) == (None, 27)  # the proxy is in use...
    tunnels = len(proxy.tunnels)
    assert tunnels >= 1
    for no_proxy in ("no_proxy", "NO_PROXY"):  # ...but not for a host NO_PROXY lists: direct, where it is unknown
        with env.context() as listed:
            listed.setenv(no_proxy, "gpu.example.org, .test")
            url = url_of(servers, "https")
            assert prompt(ctx, url) == (f"Cannot reach the nnInteractive server at {url} (ConnectError): check the "
                                        "URL and that the server is running.", 0)
    assert len(proxy.tunnels) == tunnels and proxy.forwarded == []


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_proxy_asking_for_credentials_gets_them_and_never_shows_them(ctx, env, servers, proxies, scheme, caplog):
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log every request and connection
    proxy = proxies(credentials=(USER, PASSWORD))
    variable, url, said = f"{scheme.upper()}_PROXY", url_of(servers, scheme), []
    address = f"127.0.0.1:{proxy.port}"
    env.setenv(variable, f"http://{address}")
    assert prompt(ctx, url, said) == (f"Cannot reach the nnInteractive server at {url}: the proxy {address} (from "
                                      f"{variable}) asks for a user and password (HTTP 407 Proxy Authentication "
                                      f"Required): set {variable} to http://user:password@{address}.", 0)
    env.setenv(variable, f"http://{USER}:{quote('wrong ' + PASSWORD, safe='')}@{address}")
    assert prompt(ctx, url, said) == (f"Cannot reach the nnInteractive server at {url}: the proxy {address} (from "
                                      f"{variable}) did not accept the user and password set there (HTTP 407 Proxy "
                                      "Authentication Required): correct them.", 0)
    assert proxy.refused == [407, 407] and proxy.tunnels == proxy.forwarded == []
    env.setenv(variable, f"http://{USER}:{quote(PASSWORD, safe='')}@{address}")
    assert prompt(ctx, url, said) == (None, 27)
    assert proxy.tunnels or proxy.forwarded
    shown = caplog.text + "\n".join(said)
    assert "HTTP Request: POST" in caplog.text  # the logs were captured
    tokens = [base64.b64encode(f"{USER}:{password}".encode()).decode() for password in (PASSWORD, "wrong " + PASSWORD)]
    assert not any(secret in shown for secret in (USER, PASSWORD, quote(PASSWORD, safe=""), *tokens))


def test_a_proxy_that_cannot_be_used_is_one_sentence_without_its_credentials(ctx, env, servers, proxies):
    url, closed = url_of(servers, "https"), free_port()
    env.setenv("HTTPS_PROXY", f"http://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{closed}")
    assert prompt(ctx, url) == (f"Cannot reach the nnInteractive server at {url}: the proxy 127.0.0.1:{closed} (from "
                                f"HTTPS_PROXY) cannot be reached (ConnectError): check HTTPS_PROXY, or list {NAME} in "
                                "NO_PROXY if it can be reached without the proxy.", 0)
    proxy = proxies()
    env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    elsewhere = url_of(servers, "https", host="elsewhere.test")  # a host the proxy cannot reach
    assert prompt(ctx, elsewhere) == (f"Cannot reach the nnInteractive server at {elsewhere}: the proxy "
                                      f"127.0.0.1:{proxy.port} (from HTTPS_PROXY) could not reach elsewhere.test:"
                                      f"{servers[0]['https']} (HTTP 502 Bad Gateway): check that the server is running "
                                      "at that address.", 0)
    proxy = proxies(forbidden={NAME})  # the hospital's policy
    env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    assert prompt(ctx, url) == (f"Cannot reach the nnInteractive server at {url}: the proxy 127.0.0.1:{proxy.port} "
                                f"(from HTTPS_PROXY) refused to connect to {NAME}:{servers[0]['https']} (HTTP 403 "
                                f"Forbidden): ask your IT department to allow it, or list {NAME} in NO_PROXY if it can "
                                "be reached without the proxy.", 0)
    env.setenv("all_proxy", f"socks5://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:1080")  # httpx alone would crash
    assert prompt(ctx, url) == (f"Cannot reach the nnInteractive server at {url}: all_proxy names a socks5:// proxy, "
                                "which the AI prompt tools cannot use: give an http:// proxy there, or remove it.", 0)


def test_an_untrusted_server_certificate_through_the_tunnel_is_not_blamed_on_the_proxy(ctx, env, servers, proxies):
    proxy = proxies()
    env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    env.delenv("SSL_CERT_FILE")
    url = url_of(servers, "https")
    assert prompt(ctx, url) == (UNTRUSTED.format(url=url), 0)
    assert proxy.tunnels == [f"{NAME}:{servers[0]['https']}"]  # the proxy let it through; TLS refused the server


def test_the_ca_bundle_the_user_sets_is_used_though_slicers_launcher_sets_its_own(ctx, env, servers, proxies):
    """Slicer's launcher sets SSL_CERT_FILE to Slicer's own bundle whatever the user set: REQUESTS_CA_BUNDLE (which
    the RunPod and DICOMweb calls take too) reaches the prompt client."""
    import certifi

    proxy = proxies()
    env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    env.setenv("SSL_CERT_FILE", certifi.where())  # as the launcher sets it
    url = url_of(servers, "https")
    assert prompt(ctx, url) == (UNTRUSTED.format(url=url), 0)
    env.setenv("REQUESTS_CA_BUNDLE", servers[1])
    assert prompt(ctx, url) == (None, 27)


def test_without_proxy_settings_nothing_changes(ctx, env, servers, proxies):
    proxy = proxies()  # running, but named nowhere
    assert prompt(ctx, url_of(servers, "http", host="127.0.0.1")) == (None, 27)
    url = url_of(servers, "https")
    assert prompt(ctx, url) == (f"Cannot reach the nnInteractive server at {url} (ConnectError): check the URL and "
                                "that the server is running.", 0)  # its name resolves only in the proxy
    assert proxy.tunnels == proxy.forwarded == proxy.refused == []


# -- which proxy: requests' choice (the RunPod API and readiness go through requests), loopback excepted ---------
SETTINGS = [
    {"HTTPS_PROXY": "http://proxy.example:3128"},
    {"https_proxy": "http://lower.example:1", "HTTPS_PROXY": "http://upper.example:2", "HTTP_PROXY": "http://h.ex:8"},
    {"ALL_PROXY": "http://all.example:3128", "HTTP_PROXY": "https://secure.example"},
    {"HTTPS_PROXY": f"http://{USER}:{quote(PASSWORD, safe='')}@proxy.example:8080",
     "NO_PROXY": "example.org, .hospital.local,10.0.0.0/8,192.168.1.5,gpu.example.com:8443"},
    {"https_proxy": "http://proxy.example:3128", "no_proxy": "*"},
]
URLS = ["https://abc-8000.proxy.runpod.net", "https://gpu.example.org:8000", "http://gpu.example.org",
        "https://x.hospital.local", "https://hospital.local", "https://10.20.30.40:8000", "https://11.0.0.1",
        "https://192.168.1.5:8000", "https://gpu.example.com:8443", "https://gpu.example.com:9000",
        "http://[fd00::1]:8000"]


@pytest.mark.parametrize("settings", SETTINGS)
def test_the_proxy_chosen_is_the_one_requests_chooses(monkeypatch, settings):
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    for url in URLS:
        theirs, ours = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url)), proxy_for(url)
        if theirs is None:
            assert ours is None, url
            continue
        parts = urlsplit(theirs)
        assert (ours.scheme, ours.host, ours.port) == (parts.scheme, parts.hostname,
                                                       parts.port or {"http": 80, "https": 443}[parts.scheme]), url
        assert ours.auth == (None if parts.username is None else (USER, PASSWORD)), url
        assert ours.variable in settings and USER not in f"{ours} {ours!r}", url
    for loopback in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "https://127.9.9.9"):
        assert proxy_for(loopback) is None  # requests would send an SSH tunnel's address to the proxy


def test_a_proxy_setting_that_cannot_be_used_is_named_without_its_value(monkeypatch):
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    for value, sentence in [("socks5h://u:secret@proxy.example:1080", "HTTPS_PROXY names a socks5h:// proxy"),
                            ("http://u:secret@proxy.example:port", "HTTPS_PROXY is not a proxy address"),
                            ("http://u:secret@:3128", "HTTPS_PROXY is not a proxy address")]:
        monkeypatch.setenv("HTTPS_PROXY", value)
        with pytest.raises(ProxySettingError, match=f"^{sentence}") as error:
            proxy_for("http://127.0.0.1:8000")  # even where it would not be used: httpx would fail on it
        assert "secret" not in str(error.value)

