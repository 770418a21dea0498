"""Binary glTF 2.0 (.glb): a named node, mesh and coloured material per segment, for viewers and web pages.

glTF's units are metres and its axes +Y up, +Z forward, right-handed. The patient is placed the
way an anatomy viewer expects: +X = patient left, +Y = superior (head up), +Z = anterior (facing
the viewer). From LPS millimetres that is x = L/1000, y = S/1000, z = -P/1000: a rotation, so
triangles keep facing outward.
"""

import json
import struct

import numpy as np

from ..core.files import atomic_file
from .writers import rgba

# Rows: glTF x, y, z; columns: LPS.
LPS_TO_GLTF = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]) / 1000.0
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
FLOAT, UNSIGNED_INT = 5126, 5125


def _linear(srgb: float) -> float:
    """glTF colour factors are linear; segment colours are sRGB."""
    return srgb / 12.92 if srgb <= 0.04045 else ((srgb + 0.055) / 1.055) ** 2.4


def _padded(data: bytes, filler: bytes) -> bytes:
    return data + filler * (-len(data) % 4)


def to_gltf_axes(points: np.ndarray, coordinates: str) -> np.ndarray:
    lps = points if coordinates == "LPS" else points * np.array([-1.0, -1.0, 1.0])
    return lps @ LPS_TO_GLTF.T


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Unit normals per vertex, the mean of its triangles' normals weighted by their areas, so that viewers shade
    the surface smooth (without NORMAL, glTF 2.0 3.7.2.1 has them shade each triangle flat). Triangles wind
    counter-clockwise seen from outside: the normals point out. A vertex no triangle uses gets +Y."""
    corners = vertices[triangles]
    faces = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # length: twice the area
    normals = np.stack([np.bincount(triangles.ravel(), np.repeat(faces[:, axis], 3), len(vertices))
                        for axis in range(3)], axis=1)
    length = np.linalg.norm(normals, axis=1)
    unused = length == 0
    normals[unused], length[unused] = (0.0, 1.0, 0.0), 1.0
    return normals / length[:, None]


def glb_bytes(named_meshes, coordinates: str = "LPS") -> bytes:
    """The .glb of (name, colour, points in mm, triangles) meshes given in LPS or RAS. A colour with an alpha below 1
    (the segment's 3D opacity) is blended, so that what it encloses shows through."""
    document = {"asset": {"version": "2.0", "generator": "SegmentationMachine",
                          "extras": {"units": "metre", "axes": "+X patient left, +Y superior, +Z anterior"}},
                "scene": 0, "scenes": [{"name": "segments", "nodes": []}],
                "nodes": [], "meshes": [], "materials": [], "accessors": [], "bufferViews": []}
    binary = bytearray()

    def add_view(data: np.ndarray, target: int) -> int:
        document["bufferViews"].append({"buffer": 0, "byteOffset": len(binary), "byteLength": data.nbytes,
                                        "target": target})
        binary.extend(_padded(data.tobytes(), b"\0"))
        return len(document["bufferViews"]) - 1

    for index, (name, color, points, triangles) in enumerate(named_meshes):
        exact = to_gltf_axes(points, coordinates)
        vertices = exact.astype("<f4")
        document["accessors"].append({"bufferView": add_view(vertices, ARRAY_BUFFER), "componentType": FLOAT,
                                      "count": len(vertices), "type": "VEC3",
                                      "min": vertices.min(axis=0).tolist(), "max": vertices.max(axis=0).tolist()})
        normals = vertex_normals(exact, triangles).astype("<f4")
        document["accessors"].append({"bufferView": add_view(normals, ARRAY_BUFFER), "componentType": FLOAT,
                                      "count": len(normals), "type": "VEC3"})
        indices = triangles.astype("<u4").ravel()
        document["accessors"].append({"bufferView": add_view(indices, ELEMENT_ARRAY_BUFFER),
                                      "componentType": UNSIGNED_INT, "count": len(indices), "type": "SCALAR"})
        alpha = rgba(color)[3]
        document["materials"].append({"name": name, "pbrMetallicRoughness": {
            "baseColorFactor": [*(_linear(c) for c in color[:3]), alpha], "metallicFactor": 0.0, "roughnessFactor": 0.7},
            **({"alphaMode": "BLEND"} if alpha < 1.0 else {})})
        document["meshes"].append({"name": name, "primitives": [
            {"attributes": {"POSITION": 3 * index, "NORMAL": 3 * index + 1}, "indices": 3 * index + 2,
             "material": index}]})
        document["nodes"].append({"name": name, "mesh": index})
        document["scenes"][0]["nodes"].append(index)
    document["buffers"] = [{"byteLength": len(binary)}]
    text = _padded(json.dumps(document, separators=(",", ":")).encode("utf-8"), b" ")
    chunks = (struct.pack("<I4s", len(text), b"JSON") + text + struct.pack("<I4s", len(binary), b"BIN\0")
              + bytes(binary))
    return struct.pack("<4sII", b"glTF", 2, 12 + len(chunks)) + chunks


def write_glb(path, named_meshes, coordinates: str = "LPS"):
    with atomic_file(path) as stream:
        stream.write(glb_bytes(named_meshes, coordinates))
