"""Voxel-grid helpers in NumPy alone: the child processes (the SEG writer, the presets) must not load VTK."""

from dataclasses import dataclass

import numpy as np

# Diagonal that turns RAS into LPS and back.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The RAS directions of a standard axial scan's K, J, I axes (DICOM orientation 1\0\0\0\1\0, slices from foot
# to head): superior, posterior, left.
AXIAL_DIRECTIONS_RAS = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])


def bounding_box(mask: np.ndarray) -> tuple:
    """The smallest K, J, I slices that hold every true voxel of mask (empty slices if there is none)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1) if len(hits) else slice(0, 0))
    return tuple(box)


@dataclass(frozen=True)
class AxialView:
    """A K, J, I array seen as a standard axial scan's (K from foot to head, J from front to back, I from the
    patient's right to left) whatever plane its series was acquired in: a sagittal or coronal series, or a reformat,
    is the same anatomy on its side. Views, no copies: order gives the array's axis shown as each axis of the view,
    flip whether that axis is reversed."""

    order: tuple = (0, 1, 2)
    flip: tuple = (False, False, False)

    @classmethod
    def of(cls, ijk_to_ras) -> "AxialView":
        """The view of an array on the grid ijk_to_ras describes: each axis of the view is the array's axis whose
        direction is closest to it (the superior one first), so an oblique or tilted axial scan stays as it is."""
        directions = np.asarray(ijk_to_ras, float)[:3, :3]
        directions = directions / np.linalg.norm(directions, axis=0)  # unit columns: I, J, K
        cosines = (AXIAL_DIRECTIONS_RAS @ directions)[:, ::-1]  # [axis of the view, array's K, J, I axis]
        order, flip = [], []
        for cosine in cosines:
            axis = max((a for a in range(3) if a not in order), key=lambda a: abs(cosine[a]))  # ties: the first
            order.append(axis)
            flip.append(bool(cosine[axis] < 0))
        return cls(tuple(order), tuple(flip))

    def view(self, array: np.ndarray) -> np.ndarray:
        return array.transpose(self.order)[self._reversed()]

    def back(self, array: np.ndarray) -> np.ndarray:
        """An array made on the view (a mask) on the original array's K, J, I grid."""
        return array[self._reversed()].transpose(np.argsort(self.order))

    def spacing(self, spacing_kji) -> np.ndarray:
        return np.asarray(spacing_kji, float)[list(self.order)]

    def _reversed(self) -> tuple:
        return tuple(slice(None, None, -1) if flip else slice(None) for flip in self.flip)
