"""Which hosts are this computer: plain HTTP is allowed only to them (an SSH tunnel's end), and no proxy is.
And which inputs are DICOMweb addresses, told without importing the DICOMweb client (the cloud and PACS extras)."""

import ipaddress

DICOMWEB_PREFIX = "dicomweb+"


def is_dicomweb(source) -> bool:
    return isinstance(source, str) and source.lower().startswith(DICOMWEB_PREFIX)


def is_loopback(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
