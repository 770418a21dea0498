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
