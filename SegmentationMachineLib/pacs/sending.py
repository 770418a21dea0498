"""DICOM files sent to a PACS one instance at a time (STOW-RS, or C-STORE), with a Cancel between two instances.

An instance under way is never cut off, so the PACS has each one whole or not at all, and the sentence a send ends
with (cancelled, or failed part way) says how many of the instances it has.
"""

from ..core.cancel import CancelRequest, Cancelled
from ..core.errors import UserError


def sending_cancelled(sent: int, total: int) -> str:
    """The sentence of a send cancelled after sent of total instances."""
    if sent == 0:
        return "Sending cancelled: nothing was sent."
    return (f"Sending cancelled after {sent} of {total} instances: the PACS has "
            f"{'that one' if sent == 1 else f'those {sent}'}.")


def send_instances(paths: list, store, cancel: CancelRequest = None, progress=None) -> list:
    """Any thread: store(path) for each path in turn (raising a UserError where the PACS did not store it); what each
    returned, in a list. cancel: checked before each instance; once requested the send stops there with
    Cancelled(sending_cancelled(...)). A cancel requested while the last one is sent comes too late to stop anything:
    the send is whole and returned. progress(sent, total): after each instance stored."""
    stored = []
    for path in paths:
        if cancel:
            cancel.check(sending_cancelled(len(stored), len(paths)))
        try:
            stored.append(store(path))
        except Cancelled:
            raise
        except UserError as error:
            if not stored:
                raise
            raise UserError(f"{str(error).rstrip('.')}; the PACS has the {len(stored)} of the {len(paths)} instances "
                            "sent before it.") from None
        if progress:
            progress(len(stored), len(paths))
    return stored
