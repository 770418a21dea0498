"""Undo and redo of AI prompts: the steps that made segments, many levels deep, within a memory cap.

What a step restores in the segment, and how the server follows, is the session's (session.py); this keeps
the steps in order and within MAX_UNDO_BYTES. A prompt that changed nothing is a step too (an empty box): the server
keeps it and it shapes later results, so it is part of the record (shown, saved in prompt files) and Undo takes it
back like any other. Steps the cap drops can no longer be undone, but their prompts stay in the record: a prompt file
saved from it replays every prompt that made the segment.
"""

import numpy as np

from .errors import InteractiveError
from .promptfile import Prompt

MAX_UNDO_BYTES = 256 << 20  # the undo history's memory (masks packed 8 voxels a byte); the oldest steps go first


class Step:
    """One change of a segment, undoable: the segment (target, session.py's SegmentTarget: its segmentation node and
    ID, and the editor logic that wrote it), its box and the box's mask before and after, and the voxels it took from
    other segments of that segmentation (the Segment Editor's overwrite setting), packed 8 voxels a byte (a reset of a
    512x512x300 segment keeps 20 MB instead of 160)."""

    def __init__(self, target, prompt: Prompt, box: tuple, before: np.ndarray, after: np.ndarray, taken: dict = None):
        self.target, self.prompt, self.box, self._shape = target, prompt, box, before.shape
        self._before, self._after = np.packbits(before, axis=None), np.packbits(after, axis=None)
        self._taken = {segment_id: np.packbits(mask, axis=None) for segment_id, mask in (taken or {}).items()}

    @classmethod
    def nothing(cls, target, prompt: Prompt, at) -> "Step":
        """A prompt that changed no voxel: an empty box at voxel at (K, J, I), no masks."""
        empty = np.zeros((0, 0, 0), bool)
        return cls(target, prompt, tuple(slice(int(v), int(v)) for v in at), empty, empty)

    @property
    def segment_id(self) -> str:
        return self.target.segment_id

    @property
    def empty(self) -> bool:
        """The prompt changed no voxel: its box is empty."""
        return 0 in self._shape

    def settle(self) -> "Step":
        """No longer undoable: its masks are let go, its prompt and segment kept for the record."""
        self._shape = (0, 0, 0)
        self._before = self._after = np.zeros(0, np.uint8)
        self._taken = {}
        return self

    def _unpack(self, bits) -> np.ndarray:
        return np.unpackbits(bits, count=int(np.prod(self._shape))).reshape(self._shape).astype(bool)

    @property
    def before(self) -> np.ndarray:
        return self._unpack(self._before)

    @property
    def after(self) -> np.ndarray:
        return self._unpack(self._after)

    @property
    def taken(self) -> dict:
        """{segment ID: the voxels of box this step took from that segment}."""
        return {segment_id: self._unpack(bits) for segment_id, bits in self._taken.items()}

    @property
    def nbytes(self) -> int:
        return self._before.nbytes + self._after.nbytes + sum(bits.nbytes for bits in self._taken.values())


class UndoHistory:
    """The steps done (oldest first), undone (the last undone last), and settled: done before the oldest step done,
    dropped by the memory cap, kept only for their prompts."""

    def __init__(self):
        self.done, self.undone, self.settled = [], [], []

    @property
    def record(self) -> list:
        """The steps that made the segments as they stand, oldest first."""
        return self.settled + self.done

    @property
    def can_undo(self) -> bool:
        return bool(self.done)

    @property
    def can_redo(self) -> bool:
        return bool(self.undone)

    def clear(self):
        self.done.clear()
        self.undone.clear()
        self.settled.clear()

    def remember(self, step: Step, max_bytes: int) -> str:
        """A new step: redo is gone, and the oldest steps go when the history outgrows max_bytes. Returns the
        sentence saying so, or ""."""
        self.done.append(step)
        self.undone.clear()
        dropped = 0
        while len(self.done) > 1 and sum(s.nbytes for s in self.done) > max_bytes:
            self.settled.append(self.done.pop(0).settle())
            dropped += 1
        if not dropped:
            return ""
        return (f"The undo history reached its {max_bytes >> 20} MB: the oldest "
                f"{dropped} step{'s' if dropped > 1 else ''} can no longer be undone.")

    def undo(self, restore):
        """Hands the last step done to restore(step), which sets its segment back, then keeps it for redo."""
        step = self._last(self.done, "undo")
        if step:
            restore(step)
            self.undone.append(step)

    def redo(self, restore):
        """Hands the last step undone to restore(step), which makes its change again, then keeps it for undo."""
        step = self._last(self.undone, "redo")
        if step:
            restore(step)
            self.done.append(step)

    @staticmethod
    def _last(steps: list, what: str):
        """The last of steps, taken off; where its segment is gone (deleted, or its segmentation removed), the
        steps of gone segments are dropped and InteractiveError says so."""
        if steps and not steps[-1].target.exists():
            steps[:] = [step for step in steps if step.target.exists()]
            raise InteractiveError(f"Nothing to {what}: the segment that prompt changed was deleted.")
        return steps.pop() if steps else None
