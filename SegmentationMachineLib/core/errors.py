"""User-facing failures: each message is the one sentence the user sees (what happened, what to do)."""


class UserError(Exception):
    """A failure the user can cause and fix; its message is shown as is, never with a traceback."""


class InputError(UserError):
    """The input folder or file cannot be turned into a volume."""


class SegmentationError(UserError):
    """A preset or segmentation step cannot run on the given volume."""


class ExportError(UserError):
    """Meshes cannot be written."""


class PrintError(UserError):
    """OrcaSlicer cannot be found or started."""
