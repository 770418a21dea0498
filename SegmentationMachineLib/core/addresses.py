"""Which hosts are this computer: plain HTTP is allowed only to them (an SSH tunnel's end), and no proxy is."""

import ipaddress


def is_loopback(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
