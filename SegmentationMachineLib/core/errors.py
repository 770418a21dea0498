"""User-facing failures: each message is the one sentence the user sees (what happened, what to do)."""

import ssl


class UserError(Exception):
    """A failure the user can cause and fix; its message is shown as is, never with a traceback."""


class InputError(UserError):
    """The input folder or file cannot be turned into a volume."""


class SegmentationError(UserError):
    """A preset or segmentation step cannot run on the given volume."""


class UnsuitableImage(SegmentationError):
    """An image the presets do not apply to (not a CT, a single slice): nothing failed, nothing to retry."""


class ExportError(UserError):
    """Meshes cannot be written."""


class PrintError(UserError):
    """OrcaSlicer cannot be found or started."""


def install_extra(extra: str) -> str:
    """How to add an optional part: from the folder the package was installed from (it is not on PyPI)."""
    return f"pip install -e '.[{extra}]' in the SegmentationMachine folder"


def causes(error: BaseException) -> list:
    """error and what it wraps, outermost first: requests wraps urllib3's error (its reason), which wraps the
    socket's or ssl's; httpx wraps httpcore's (its cause or context)."""
    chain = []
    while isinstance(error, BaseException) and len(chain) < 10:  # a reason may be text (ssl.SSLError's)
        chain.append(error)
        reason = getattr(error, "reason", None)
        error = reason if isinstance(reason, BaseException) else error.__cause__ or error.__context__
    return chain


def untrusted_certificate(error: BaseException) -> str:
    """Why TLS refused the server's certificate, when error comes from that, else "" (a proxy that inspects TLS
    re-signs with its own CA)."""
    refused = [c for c in causes(error) if isinstance(c, ssl.SSLCertVerificationError)]
    return (refused[0].verify_message or "certificate verify failed") if refused else ""
