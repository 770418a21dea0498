"""Printable mesh files: binary STL (written and read back), OBJ with materials, 3MF. Each file appears whole
or not at all."""

import re
import zipfile
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from ..core.files import atomic_file
from .check import face_normals, without_degenerate


# Rows formatted per call: one call per mesh held the GIL (and Slicer's GUI) for 0.1-0.2 s on a large bone, longer
# on a whole skeleton; 20,000 rows take a few milliseconds.
ROWS_PER_CHUNK = 20_000


ZIP64_FROM = 2**30 // 100  # vertices and triangles: each is under 100 bytes of 3MF text


def _rows(row_format: str, values: np.ndarray):
    """values (N, k) as text, row_format per row, in chunks of ROWS_PER_CHUNK rows."""
    for start in range(0, len(values), ROWS_PER_CHUNK):
        part = values[start:start + ROWS_PER_CHUNK]
        yield (row_format * len(part)) % tuple(part.ravel())


# Characters XML 1.0 forbids (quoteattr leaves them): one in a name made slicers refuse the whole 3MF
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_name(text: str) -> str:
    """A name as an XML attribute value, quoted."""
    return quoteattr(_NOT_XML.sub("", text))


def _hex_color(color) -> str:
    return "#" + "".join(f"{int(round(max(0.0, min(1.0, c)) * 255)):02X}" for c in color[:3])


def write_stl(path: Path, meshes, title: str = "SegmentationMachine"):
    """One binary STL holding all given (points, triangles, normals) meshes; normals may be None."""
    record = np.dtype([("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attribute", "<u2")])
    parts = []
    for points, triangles, normals in meshes:
        corners = points.astype(np.float32)[triangles]  # STL stores float32
        normals = face_normals(corners) if normals is None else normals.astype(np.float32)
        lengths = np.linalg.norm(normals, axis=1, keepdims=True)
        part = np.zeros(len(triangles), record)
        part["normal"] = np.divide(normals, lengths, out=np.zeros_like(normals), where=lengths > 0)
        part["corners"] = corners
        parts.append(part)
    data = np.concatenate(parts) if parts else np.zeros(0, record)
    # A binary STL header must not start with "solid", or readers take it for ASCII.
    header = f"binary STL from {title}".encode("ascii", "replace")[:80].ljust(80, b" ")
    with atomic_file(path) as stream:
        stream.write(header)
        stream.write(np.uint32(len(data)).tobytes())
        stream.write(data.tobytes())


def read_stl(path: Path):
    """(points, triangles) of a binary STL, its corners merged into shared vertices (exactly equal ones: a
    closed mesh written by write_stl reads back closed), less triangles that collapsed (3MF forbids them); None
    when the file is no binary STL."""
    data = Path(path).read_bytes()
    count = int(np.frombuffer(data, "<u4", 1, 80)[0]) if len(data) >= 84 else -1
    if count < 0 or len(data) != 84 + 50 * count:
        return None
    record = np.dtype([("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attribute", "<u2")])
    corners = np.frombuffer(data, record, count, 84)["corners"].reshape(-1, 3)
    points, triangles = np.unique(corners, axis=0, return_inverse=True)
    return points.astype(float), without_degenerate(triangles.reshape(-1, 3))


def rgba(color) -> tuple:
    """A segment colour with its alpha (opaque when it has none)."""
    return (*color, 1.0)[:4]


def write_obj(path: Path, named_meshes):
    """One OBJ with a group and a material (colour, and opacity where the colour has an alpha) per mesh, and its
    .mtl beside it."""
    path = Path(path)
    material_path = path.with_suffix(".mtl")
    with atomic_file(material_path, "w") as stream:
        for name, color, _, _ in named_meshes:
            r, g, b, alpha = rgba(color)
            stream.write(f"newmtl {name}\nKa 0 0 0\nKd {r:.4f} {g:.4f} {b:.4f}\nKs 0 0 0\nd {alpha:.4g}\nillum 1\n\n")
    with atomic_file(path, "w") as stream:
        stream.write(f"# SegmentationMachine\nmtllib {material_path.name}\n")
        offset = 1
        for name, _, points, triangles in named_meshes:
            stream.write(f"o {name}\ng {name}\nusemtl {name}\n")
            stream.writelines(_rows("v %.6f %.6f %.6f\n", points))
            stream.writelines(_rows("f %d %d %d\n", triangles + offset))
            offset += len(points)


_CONTENT_TYPES = """<?xml version="1.0" encoding="UTF-8"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">
 <Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>
 <Default Extension="model" ContentType="application/vnd.ms-package.3dmanufacturing-3dmodel+xml"/>
 <Default Extension="config" ContentType="application/xml"/>
</Types>
"""
_RELS = """<?xml version="1.0" encoding="UTF-8"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">
 <Relationship Target="/3D/3dmodel.model" Id="rel0" Type="http://schemas.microsoft.com/3dmanufacturing/2013/01/3dmodel"/>
</Relationships>
"""
# OrcaSlicer and Bambu Studio name a 3MF's parts only from this file of theirs (else after the object).
_PART_NAMES = "Metadata/model_settings.config"


def _model_xml(named_meshes, title: str, assembly: int):
    """Core 3MF, in chunks of text: a mesh object per segment (named, coloured), one assembly object made of them
    all (components without transforms: identity), and one build item, so that slicers load a single object with a
    part per segment, where the segments lie relative to each other."""
    materials = "".join(f'  <base name={_xml_name(name)} displaycolor="{_hex_color(color)}"/>\n'
                        for name, color, _, _ in named_meshes)
    yield ('<?xml version="1.0" encoding="UTF-8"?>\n'
           '<model unit="millimeter" xml:lang="en-US" '
           'xmlns="http://schemas.microsoft.com/3dmanufacturing/core/2015/02">\n'
           ' <metadata name="Application">SegmentationMachine</metadata>\n'
           f' <resources>\n  <basematerials id="1">\n{materials}  </basematerials>\n')
    for index, (name, _, points, triangles) in enumerate(named_meshes):
        yield (f'  <object id="{index + 2}" type="model" name={_xml_name(name)} pid="1" pindex="{index}">\n'
               "   <mesh>\n    <vertices>\n")
        yield from _rows('     <vertex x="%.6f" y="%.6f" z="%.6f"/>\n', points)
        yield "    </vertices>\n    <triangles>\n"
        yield from _rows('     <triangle v1="%d" v2="%d" v3="%d"/>\n', triangles)
        yield "    </triangles>\n   </mesh>\n  </object>\n"
    yield f'  <object id="{assembly}" type="model" name={_xml_name(title)}>\n   <components>\n'
    yield "".join(f'    <component objectid="{index + 2}"/>\n' for index in range(len(named_meshes)))
    yield (f'   </components>\n  </object>\n </resources>\n <build>\n  <item objectid="{assembly}"/>\n'
           " </build>\n</model>\n")


def _part_names_xml(named_meshes, title: str, assembly: int) -> str:
    parts = "".join(f'  <part id="{index + 2}" subtype="normal_part">\n'
                    f'   <metadata key="name" value={_xml_name(name)}/>\n  </part>\n'
                    for index, (name, _, _, _) in enumerate(named_meshes))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<config>\n <object id="{assembly}">\n'
            f'  <metadata key="name" value={_xml_name(title)}/>\n{parts} </object>\n</config>\n')


def write_3mf(path: Path, named_meshes, title: str = None):
    """One 3MF holding one object (title, else the file's name) with a named, coloured part per mesh;
    coordinates kept as given."""
    title = title or Path(path).stem
    assembly = len(named_meshes) + 2  # ids: 1 the materials, 2... the meshes, then the object made of them
    with atomic_file(path) as stream:
        with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as package:
            package.writestr("[Content_Types].xml", _CONTENT_TYPES)
            package.writestr("_rels/.rels", _RELS)
            # Streamed, never the whole text at once; ZIP64 only where the text may pass 2 GiB (zipfile refuses to go
            # on there without it): the 3MF spec asks for plain ZIP where the model fits.
            large = sum(len(points) + len(triangles) for _, _, points, triangles in named_meshes) > ZIP64_FROM
            with package.open("3D/3dmodel.model", "w", force_zip64=large) as model:
                for chunk in _model_xml(named_meshes, title, assembly):
                    model.write(chunk.encode())
            package.writestr(_PART_NAMES, _part_names_xml(named_meshes, title, assembly))
