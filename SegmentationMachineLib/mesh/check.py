"""What a printer needs to know about a mesh: is it closed, how big, how many triangles."""

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class MeshCheck:
    triangles: int
    boundary_edges: int  # edges with one triangle: holes
    non_manifold_edges: int  # edges with three or more triangles
    volume_ml: float
    bounds_min_mm: list
    bounds_max_mm: list

    @property
    def watertight(self) -> bool:
        return self.triangles > 0 and self.boundary_edges == 0 and self.non_manifold_edges == 0

    def as_dict(self) -> dict:
        return {**asdict(self), "watertight": self.watertight}


def face_normals(corners: np.ndarray) -> np.ndarray:
    """Unnormalised triangle normals (length = twice the area) for (M, 3, 3) corner coordinates."""
    u = corners[:, 1] - corners[:, 0]
    v = corners[:, 2] - corners[:, 0]
    # Written out: np.cross costs several times more on arrays of this size.
    return np.stack([u[:, 1] * v[:, 2] - u[:, 2] * v[:, 1],
                     u[:, 2] * v[:, 0] - u[:, 0] * v[:, 2],
                     u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]], axis=1)


def signed_volume_mm3(points: np.ndarray, triangles: np.ndarray, normals: np.ndarray) -> float:
    """Enclosed volume, positive when the triangles face outward (normals from face_normals).

    Divergence theorem: p0 . (p1-p0)x(p2-p0) = p0 . p1xp2, six times a signed tetrahedron from the origin.
    """
    return float(np.einsum("ij,ij->i", points[triangles[:, 0]], normals).sum()) / 6.0


_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9], np.uint64)


def _maybe_repeated(rows: np.ndarray) -> np.ndarray:
    """Indices of the rows (N, 3 integers) that may occur more than once. Equal rows share a hash, so a row with a
    hash of its own occurs once: one sort of N keys instead of a sort of N rows (several times slower)."""
    keys = np.bitwise_xor.reduce(rows.astype(np.uint64) * _MIX, axis=1)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return np.flatnonzero(counts[inverse.reshape(-1)] > 1)


def without_degenerate(triangles: np.ndarray) -> np.ndarray:
    """triangles less those with a corner twice (3MF forbids them), less back-to-back pairs on the same three corners
    (decimation leaves them: each of their edges then has four triangles, the mesh is not closed), and with one of
    any copies facing the same way."""
    triangles = triangles[(triangles[:, 0] != triangles[:, 1]) & (triangles[:, 1] != triangles[:, 2])
                          & (triangles[:, 0] != triangles[:, 2])]
    maybe = _maybe_repeated(np.sort(triangles, axis=1))
    if len(maybe) == 0:
        return triangles
    rows = triangles[maybe]
    facing = ((rows[:, 0] > rows[:, 1]).astype(int) + (rows[:, 0] > rows[:, 2]) + (rows[:, 1] > rows[:, 2])) % 2
    group = np.unique(np.sort(rows, axis=1), axis=0, return_inverse=True)[1].reshape(-1)
    keep = np.ones(len(triangles), bool)
    keep[maybe] = False
    for same_corners in range(group.max() + 1):  # a few: only the candidates
        ways = [np.flatnonzero((group == same_corners) & (facing == way)) for way in (0, 1)]
        if len(ways[0]) != len(ways[1]):  # pairs facing apart cancel; of copies facing alike, one stays
            keep[maybe[max(ways, key=len)[0]]] = True
    return triangles[keep]


def merged_as_float32(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """triangles with their corners that are one point in float32 (as STL and 3MF store them) made one vertex:
    smoothing and decimation leave a few closer than that tells apart, and the files would hold collapsed triangles
    that the report did not see."""
    stored = points.astype(np.float32) + np.float32(0)  # -0.0 is 0.0
    maybe = _maybe_repeated(stored.view(np.uint32))
    if len(maybe) == 0:
        return triangles
    _, first, inverse = np.unique(stored[maybe], axis=0, return_index=True, return_inverse=True)
    vertex = np.arange(len(points))
    vertex[maybe] = maybe[first][inverse.reshape(-1)]
    return vertex[triangles]


def check_mesh(points: np.ndarray, triangles: np.ndarray, normals: np.ndarray = None) -> MeshCheck:
    """normals: the triangles' face_normals when already computed (they are the costly part)."""
    if len(triangles) == 0:
        return MeshCheck(0, 0, 0, 0.0, [0.0] * 3, [0.0] * 3)
    first = triangles.ravel().astype(np.int64)
    second = triangles[:, [1, 2, 0]].ravel().astype(np.int64)
    keys = np.minimum(first, second) * (int(triangles.max()) + 1) + np.maximum(first, second)
    keys.sort()
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1], [True]]))
    counts = np.diff(starts)  # how many triangles share each distinct edge
    if normals is None:
        normals = face_normals(points[triangles])
    used = np.zeros(len(points), bool)
    used[triangles.ravel()] = True
    used = points[used]
    volume_mm3 = signed_volume_mm3(points, triangles, normals)
    return MeshCheck(
        triangles=int(len(triangles)),
        boundary_edges=int((counts == 1).sum()),
        non_manifold_edges=int((counts > 2).sum()),
        volume_ml=round(float(volume_mm3) / 1000.0, 4),
        bounds_min_mm=[round(float(v), 3) for v in used.min(axis=0)],
        bounds_max_mm=[round(float(v), 3) for v in used.max(axis=0)],
    )
