"""Which proxy the AI prompt client goes through: the one requests would use for the server's address.

Hospitals often allow the outside world only through an HTTP proxy, set in HTTPS_PROXY, HTTP_PROXY or
ALL_PROXY (either case) or, on Windows and macOS, in the system's settings; NO_PROXY lists the hosts reached
directly. The RunPod API and a pod's readiness check go through requests, so the prompt client follows
requests' rules for the same URL, with one exception: a loopback address (an SSH tunnel, a server on this
computer) is never proxied, as the proxy cannot reach this computer's loopback.
Standard library only: session.py imports it where the AI client is not installed.
"""

import ipaddress
import os
import socket
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from ..core.addresses import is_loopback

DEFAULT_PORTS = {"http": 80, "https": 443}  # how the proxy itself is reached


class ProxySettingError(ValueError):
    """A proxy setting this client cannot use; the message names the setting, never its credentials."""


@dataclass(frozen=True)
class Proxy:
    scheme: str
    host: str
    port: int
    variable: str = None  # the environment variable it is set in; None: the system's proxy settings
    auth: tuple = field(default=None, repr=False)  # (user, password), decoded; never shown

    def __str__(self) -> str:
        return f"the proxy {_host_port(self.host, self.port)} (from {self.variable or 'the system proxy settings'})"

    def unreachable(self, what: str, host: str) -> str:
        return (f"{self} cannot be reached ({what}): check {self.variable or 'the proxy setting'}, or list {host} "
                "in NO_PROXY if it can be reached without the proxy")

    def refused(self, status: int, reason: str, host: str, port=None) -> str:
        """What the proxy's answer to a request for host (port: None for its scheme's) means, and what to do."""
        said, target = f"HTTP {status} {reason}".strip(), _host_port(host, port)
        if status == 407 and self.auth:
            return f"{self} did not accept the user and password set there ({said}): correct them"
        if status == 407:
            return (f"{self} asks for a user and password ({said}): set {self.variable or 'HTTPS_PROXY'} to "
                    f"{self.scheme}://user:password@{_host_port(self.host, self.port)}")
        if status >= 500:
            return f"{self} could not reach {target} ({said}): check that the server is running at that address"
        return (f"{self} refused to connect to {target} ({said}): ask your IT department to allow it, or list "
                f"{host} in NO_PROXY if it can be reached without the proxy")


def proxy_for(url: str) -> Proxy | None:
    """The proxy to reach url through, or None to connect directly. Every proxy setting is checked, used or
    not: the upstream client's httpx fails on one it cannot use (a SOCKS proxy) whatever the URL."""
    found = urllib.request.getproxies()
    settings = {key: _proxy(found[key], _variable(key, found[key])) for key in ("http", "https", "all")
                if found.get(key)}
    parts = urlsplit(url)
    if not parts.hostname or is_loopback(parts.hostname) or _bypassed(parts.hostname, parts.port):
        return None
    return settings.get(parts.scheme) or settings.get("all")


def _proxy(value: str, variable: str) -> Proxy:
    parts = urlsplit(value if "://" in value else "http://" + value)  # host:port alone, as curl and httpx read it
    where = variable or "The system proxy setting"
    if parts.scheme not in DEFAULT_PORTS:
        raise ProxySettingError(f"{where} names a {parts.scheme}:// proxy, which the AI prompt tools cannot use: "
                                "give an http:// proxy there, or remove it")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ProxySettingError(f"{where} is not a proxy address: give one like http://proxy.example:3128")
    auth = None if parts.username is None else (unquote(parts.username), unquote(parts.password or ""))
    return Proxy(parts.scheme, parts.hostname, port, variable, auth)


def _variable(key: str, value: str) -> str:
    """The environment variable a proxy of getproxies() came from; None where it came from the system's settings."""
    return next((name for name in os.environ if name.lower() == f"{key}_proxy" and os.environ[name] == value), None)


def _bypassed(host: str, port) -> bool:
    """NO_PROXY as requests reads it (IPv4 addresses by address or network like 10.0.0.0/8, names by domain, with
    or without the port), then as urllib reads it (with, on Windows and macOS, the system's exceptions)."""
    listed = (os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or "").replace(" ", "").split(",")
    entries = [entry for entry in listed if entry]
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        names = (host, f"{host}:{port}") if port else (host,)
        domains = [entry.lstrip(".") for entry in entries]
        if any(name == domain or name.endswith("." + domain) for name in names for domain in domains):
            return True
    else:
        if any(address in network for network in map(_network, entries) if network):
            return True
    try:
        return bool(urllib.request.proxy_bypass(host))
    except (TypeError, socket.gaierror):  # as requests: the macOS settings may name hosts that do not resolve
        return False


def _network(entry: str):
    try:
        return ipaddress.IPv4Network(entry, strict=False)
    except ValueError:
        return None


def _host_port(host: str, port) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"
