"""DICOM UIDs as they come from the network or the user: digits and dots, at most 64 characters (PS3.5 9.1)."""

import re

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_uid(text: str) -> bool:
    return len(text) <= 64 and _UID.fullmatch(text) is not None
