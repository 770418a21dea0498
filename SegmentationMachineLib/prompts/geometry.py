"""Prompts in RAS millimetres → the voxel grid the server sees (array axes K, J, I of the volume).

Works for any IJK-to-RAS matrix: oblique, mirrored, anisotropic. A box becomes the voxel box that
holds its corners; a scribble is painted along its polyline; a lasso fills the voxels inside it.
Scribbles and lassos go to the model on one voxel plane (axial, coronal or sagittal of the image),
as it was trained: one drawn on an oblique slice is projected onto the nearest such plane.
Prompts come in world RAS (Slicer's views); under a parent transform, to_local maps them point by
point into the volume's own RAS first (frames.world_to_local), exact for non-linear transforms too.
"""

import numpy as np
from scipy import ndimage

from ..core.errors import UserError


class PromptOutsideError(UserError):
    """A prompt that does not touch the image."""


def ras_to_kji(ijk_to_ras: np.ndarray, ras) -> np.ndarray:
    """(N, 3) RAS points → (N, 3) continuous voxel coordinates in array order (k, j, i)."""
    ras = np.atleast_2d(np.asarray(ras, float))
    ijk = (np.linalg.inv(ijk_to_ras) @ np.c_[ras, np.ones(len(ras))].T)[:3].T
    return ijk[:, ::-1]


def _kji(ijk_to_ras, ras, to_local=None) -> np.ndarray:
    """World RAS points → continuous (k, j, i), through the volume's parent transform when there is one."""
    ras = np.atleast_2d(np.asarray(ras, float))
    return ras_to_kji(ijk_to_ras, ras if to_local is None else to_local(ras))


def _check_inside(kji: np.ndarray, shape, what: str):
    if (kji < -0.5).any() or (kji > np.array(shape) - 0.5).any():
        raise PromptOutsideError(f"The {what} is outside the image: place it on the volume.")


def _check_near(kji: np.ndarray, shape, what: str):
    """A drawing may leave the image, by up to the image's own size: a point farther out is a mistake (a
    mistyped coordinate in a prompt file), and painting towards it would cost memory in proportion."""
    size = np.array(shape)
    if (kji < -size).any() or (kji > 2 * size).any():
        raise PromptOutsideError(f"The {what} reaches far beyond the image (a point lies farther outside it than "
                                 "the image is large): draw it on the volume.")


def point_voxel(ijk_to_ras, shape, ras, to_local=None) -> tuple:
    kji = _kji(ijk_to_ras, ras, to_local)[0]
    _check_inside(kji, shape, "point")
    return tuple(int(v) for v in np.clip(np.rint(kji), 0, np.array(shape) - 1))


def box_voxels(ijk_to_ras, shape, ras_min, ras_max, to_local=None) -> list:
    """Half-open [[lo, hi]] per axis of the voxel box holding the RAS box's corners.

    A box flat along a RAS axis (drawn in a slice view) becomes one slice across the voxel axis
    closest to that RAS axis: the server's boxes are axis-aligned in voxels, and on an oblique
    grid the flat RAS box is a tilted plane. Under a parent transform each corner is mapped: a
    linear one keeps the box a parallelepiped, so the corners bound it exactly; a non-linear one
    bends its faces, which may bulge a little past the corners' voxel box or fall short of it
    (not for Slicer's gantry-tilt acquisition transform, which shifts each slice as a whole).
    """
    corners = np.array([[x, y, z] for x in (ras_min[0], ras_max[0]) for y in (ras_min[1], ras_max[1])
                        for z in (ras_min[2], ras_max[2])])
    kji = _kji(ijk_to_ras, corners, to_local)
    low, high = kji.min(axis=0), kji.max(axis=0)
    flat_ras = [axis for axis in range(3) if ras_max[axis] == ras_min[axis]]
    if flat_ras:
        # The voxel axis that a 1 mm step across the drawn plane, at the box's centre, goes along farthest.
        centre = (np.asarray(ras_min, float) + np.asarray(ras_max, float)) / 2
        step = np.diff(_kji(ijk_to_ras, [centre, centre + np.eye(3)[flat_ras[0]]], to_local), axis=0)[0]
        flat = int(np.argmax(np.abs(step) * np.linalg.norm(ijk_to_ras[:3, :3], axis=0)[::-1]))
    else:
        flat = int(np.argmin(high - low)) if (high - low).min() < 0.5 else None
    box = []
    for axis in range(3):
        if axis == flat:
            centre = int(np.clip(np.rint((low[axis] + high[axis]) / 2), 0, shape[axis] - 1))
            box.append([centre, centre + 1])
        else:
            lo, hi = int(np.ceil(low[axis] - 1e-6)), int(np.floor(high[axis] + 1e-6)) + 1
            box.append([max(lo, 0), min(hi, shape[axis])])
    if any(lo >= hi for lo, hi in box):
        raise PromptOutsideError("The box is outside the image (or holds no voxel centre): draw it on the volume.")
    return box


def _plane_axes(kji: np.ndarray):
    """Normal of the best-fitting plane through points and two in-plane unit vectors."""
    centred = kji - kji.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=True)
    return vt[2], vt[0], vt[1]


def _normal_axis(kji: np.ndarray) -> int:
    """The voxel axis closest to the normal of the plane the points were drawn on; for a line, the axis it spans
    least (a stroke straight along a voxel axis fits two planes: the first, K, is taken, where most are drawn)."""
    centred = kji - kji.mean(axis=0)
    if len(kji) >= 3 and np.linalg.matrix_rank(centred, tol=1e-6) >= 2:
        return int(np.argmax(np.abs(_plane_axes(kji)[0])))
    return int(np.argmin(np.ptp(kji, axis=0)))


def onto_voxel_plane(kji: np.ndarray, shape) -> np.ndarray:
    """Points drawn on any slice → the same points on the nearest plane of the voxel grid: the axis
    closest to their plane's normal (_normal_axis) is set to their mean slice."""
    axis = _normal_axis(kji)
    flat = kji.copy()
    flat[:, axis] = np.clip(np.rint(kji[:, axis].mean()), 0, shape[axis] - 1)
    return flat


def _crop(kji: np.ndarray, shape, margin: int):
    """Integer bounds (low inclusive, high exclusive) around points, with a margin, inside the image."""
    low = np.floor(kji.min(axis=0) - margin).astype(int).clip(0)
    high = (np.ceil(kji.max(axis=0) + margin).astype(int) + 1).clip(max=np.array(shape))
    return low, high


def scribble_mask(ijk_to_ras, shape, ras_points, thickness, to_local=None):
    """(mask, box): the polyline painted to the server's preferred thickness (voxels), as a crop of the
    K, J, I grid and its half-open box, so only the scribble's neighbourhood travels."""
    kji = _kji(ijk_to_ras, ras_points, to_local)
    _check_near(kji, shape, "scribble")
    _check_inside(kji.mean(axis=0, keepdims=True), shape, "scribble")
    normal = _normal_axis(kji)
    kji = onto_voxel_plane(kji, shape)
    low, high = _crop(kji, shape, int(np.ceil(max(thickness))) + 1)
    mask = np.zeros(high - low, bool)
    for start, end in zip(kji[:-1], kji[1:]):
        steps = max(2, int(np.ceil(np.abs(end - start).max() * 4)) + 1)
        samples = np.rint(np.linspace(start, end, steps)).astype(int) - low
        inside = ((samples >= 0) & (samples < mask.shape)).all(axis=1)
        mask[tuple(samples[inside].T)] = True
    # Widened to the thickness across the stroke too (a straight stroke along a voxel axis included), but only
    # within its slice.
    size = [1 if a == normal else max(1, int(round(thickness[a]))) for a in range(3)]
    if max(size) > 1:
        mask = ndimage.binary_dilation(mask, np.ones(size, bool))
    return mask, [[int(lo), int(hi)] for lo, hi in zip(low, high)]


def lasso_mask(ijk_to_ras, shape, ras_points, to_local=None):
    """(mask, box): the closed polygon filled on its voxel plane, as a crop of the K, J, I grid and its
    half-open box."""
    kji = _kji(ijk_to_ras, ras_points, to_local)
    _check_near(kji, shape, "lasso")
    _check_inside(kji.mean(axis=0, keepdims=True), shape, "lasso")
    kji = onto_voxel_plane(kji, shape)
    normal, u, v = _plane_axes(kji)
    low, high = _crop(kji, shape, 1)
    grid = np.stack(np.meshgrid(*[np.arange(lo, hi) for lo, hi in zip(low, high)], indexing="ij"), -1).reshape(-1, 3)
    centre = kji.mean(axis=0)
    near = np.abs((grid - centre) @ normal) <= 0.5 + 1e-6  # one voxel thick, whatever the plane's tilt
    polygon = np.c_[(kji - centre) @ u, (kji - centre) @ v]
    candidates = grid[near]
    inside = _inside_polygon(np.c_[(candidates - centre) @ u, (candidates - centre) @ v], polygon)
    mask = np.zeros(high - low, bool)
    mask[tuple((candidates[inside] - low).T)] = True
    if not mask.any():
        raise PromptOutsideError("The lasso encloses no voxel: draw a larger outline.")
    return mask, [[int(lo), int(hi)] for lo, hi in zip(low, high)]


def _inside_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points."""
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = ((y0 > y) != (y1 > y)) & (x < (x1 - x0) * (y - y0) / np.where(y1 == y0, 1e-12, y1 - y0) + x0)
    return (crosses.sum(axis=1) % 2) == 1
