"""Voxel-grid helpers in NumPy alone: the child processes (the SEG writer, the presets) must not load VTK."""

import numpy as np

# Diagonal that turns RAS into LPS and back.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def bounding_box(mask: np.ndarray) -> tuple:
    """The smallest K, J, I slices that hold every true voxel of mask (empty slices if there is none)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1) if len(hits) else slice(0, 0))
    return tuple(box)
