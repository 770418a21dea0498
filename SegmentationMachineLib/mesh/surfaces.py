"""Closed surfaces from a segmentation node's binary labelmaps: one mesh per segment, in world RAS mm, where
Slicer's views show it: through the segmentation's parent transform, a matrix when linear, else point by point.

Every export format is written from these meshes, so STL, OBJ and 3MF line up exactly. Each
segment is contoured on its own padded bounding box (padding closes the surface at the edge of
the image); segments are processed on a thread pool because VTK's filters release the GIL.
"""

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum

import numpy as np
import vtk
from scipy import ndimage
from vtkmodules.util import numpy_support

from ..core import arrays
from ..core.errors import ExportError
from ..core.scene import BINARY_LABELMAP, SceneContext, editing
from .check import face_normals, merged_as_float32, signed_volume_mm3, without_degenerate

# Gaussian sigma, in voxels along each axis, at smoothing 1.0. Relative to the voxel because the
# staircase to remove is one voxel high; at the default 0.5 (0.6 voxel) sheets one voxel thick survive.
MAX_SIGMA_VOXELS = 1.2
# Blurring, and marching cubes itself, cut the corners of anything a few voxels thin (ribs on a 3 mm
# scan lost 25-63% of their volume at smoothing 0.5 and iso-level 0.5, and vanished at 1.0): the iso-level
# is lowered until the mesh holds the segment's voxel volume, within VOLUME_TOLERANCE, never below
# MIN_ISO_LEVEL (where the gap of a single voxel between two parts of a segment would close); where even
# that falls short, the segment is too thin for the smoothing asked, and its sigma is lowered by
# SIGMA_STEP, down to MIN_SIGMA_VOXELS (where even a single voxel keeps its volume).
VOLUME_TOLERANCE = 0.01
MIN_ISO_LEVEL = 0.3
SIGMA_STEP = 0.75
MIN_SIGMA_VOXELS = 0.25
# Surface nets smooth the mesh itself, which thins thin parts too (a bone preset's phantom lost 11% at 28
# iterations, 3.5% at 8): fewer iterations where a segment would lose more than this.
NETS_VOLUME_TOLERANCE = 0.05
# Under a non-linear transform, a point this far outside the surface (in voxels) must still lie on the side the
# triangles face once both are mapped to world; where it does not, the transform folds space there.
FOLD_PROBE_VOXELS = 0.05
# A vertex turned over (or kept) when the cosine between its probe and its triangles' normal is beyond this: near
# 0 at saddles, where the triangles around a vertex face every way, neither is said.
FOLD_COSINE = 0.5


class SurfaceMethod(str, Enum):
    FLYING_EDGES = "flying_edges"  # marching cubes: watertight, the default
    SURFACE_NETS = "surface_nets"  # fewer, more even triangles; may touch itself where voxels meet diagonally


@dataclass(frozen=True)
class SurfaceOptions:
    method: SurfaceMethod = SurfaceMethod.FLYING_EDGES
    smoothing: float = 0.5  # 0 (none) .. 1 (strong), as Slicer's "Smoothing factor"
    decimation: float = 0.0  # fraction of triangles to remove, 0 .. 0.95
    threads: int = 2


@dataclass
class SegmentMesh:
    segment_id: str
    name: str
    color: tuple  # RGB 0..1
    points: np.ndarray  # (N, 3) float64, RAS mm (world, through the segmentation's transform, linear or not)
    triangles: np.ndarray  # (M, 3) int64, counter-clockwise seen from outside
    normals: np.ndarray  # (M, 3) outward face normals, length twice the triangle's area
    voxel_volume_ml: float = 0.0  # the segment's voxels, what the mesh's volume is compared with
    iso_level: float = None  # where flying edges cut the (smoothed) mask; None for surface nets
    sigma_voxels: float = 0.0  # the Gaussian's sigma this segment was smoothed with (flying edges)
    opacity: float = 1.0  # its 3D opacity in the segmentation's display (.glb and .obj carry it)


def _to_world(segmentation_node):
    """(matrix, warp): the segmentation's RAS to world. A linear transform (or none) is the matrix, and warp None;
    a non-linear one (the acquisition transform Slicer puts on a gantry-tilted series, a deformable registration)
    is warp, a vtkGeneralTransform each mesh's points go through, and the matrix the identity. Updated here, on the
    main thread: workers then only read it (it holds the scene's transforms, which VTK keeps alive)."""
    transform_node = segmentation_node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4), None
    if transform_node.IsTransformToWorldLinear():
        matrix = vtk.vtkMatrix4x4()
        transform_node.GetMatrixTransformToWorld(matrix)
        return arrays.matrix_to_array(matrix), None
    warp = vtk.vtkGeneralTransform()
    transform_node.GetTransformToWorld(warp)
    warp.Update()
    return np.eye(4), warp


def _padding(options: SurfaceOptions) -> int:
    """Background voxels around a crop: enough for the blurred edge to fall below the iso-value."""
    return 1 + int(np.ceil(2 * MAX_SIGMA_VOXELS * options.smoothing))


def _flying_edges(contour_filter, image: vtk.vtkImageData, value: float) -> vtk.vtkPolyData:
    contour_filter.SetInputData(image)
    contour_filter.SetValue(0, value)
    contour_filter.ComputeNormalsOff()
    contour_filter.ComputeGradientsOff()
    contour_filter.ComputeScalarsOff()
    contour_filter.Update()
    surface = vtk.vtkPolyData()
    surface.ShallowCopy(contour_filter.GetOutput())  # the filter's output changes with the next level
    return surface


def _enclosed_voxels(surface: vtk.vtkPolyData) -> float:
    points, triangles = _mesh_arrays(surface)
    return abs(signed_volume_mm3(points, triangles, face_normals(points[triangles]))) if len(triangles) else 0.0


def _volume_matched(field: np.ndarray, voxels: int, sigma: float):
    """(surface, iso-level, enclosed voxels): the level at or below 0.5 whose surface holds `voxels` voxels.

    Newton's step from the surface area first (a Gaussian-blurred edge has slope 1/(sqrt(2 pi) sigma)
    per voxel), then false position between the nearest levels on either side (thin parts have gentler
    slopes, so Newton overshoots). Segments that hold their volume at 0.5 take one contour; thin ones
    up to four more.
    """
    contour_filter, image = vtk.vtkFlyingEdges3D(), arrays.image_from_array(field)
    first = _flying_edges(contour_filter, image, 0.5)
    tried = {0.5: (_enclosed_voxels(first), first)}  # level -> (volume, surface)
    slope = 1.0 / (np.sqrt(2 * np.pi) * sigma)
    level = 0.5
    for _ in range(4):
        volume = tried[level][0]
        if abs(voxels - volume) <= VOLUME_TOLERANCE * voxels or (level <= MIN_ISO_LEVEL and volume < voxels):
            break
        small = [t for t, (v, _) in tried.items() if v < voxels]  # levels too high: the mesh too small
        big = [t for t, (v, _) in tried.items() if v > voxels]
        if not small:
            break  # 0.5 already holds more than the voxels (hollow shapes): never raised
        high = min(small)
        if big:  # false position between the nearest levels on either side; V(level) is decreasing
            low = max(big)
            (v_high, _), (v_low, _) = tried[high], tried[low]
            level = high - (high - low) * (voxels - v_high) / (v_low - v_high)
        else:
            area = 0.5 * float(np.linalg.norm(_normals_of(tried[high][1]), axis=1).sum())
            level = max(MIN_ISO_LEVEL, high - (voxels - tried[high][0]) * slope / max(area, 1e-9))
        surface = _flying_edges(contour_filter, image, level)
        tried[level] = (_enclosed_voxels(surface), surface)
    best = min(tried, key=lambda t: abs(voxels - tried[t][0]))
    return tried[best][1], best, tried[best][0]


def _smoothed(mask: np.ndarray, sigma: float):
    """(surface, iso-level, sigma): the asked sigma where the segment keeps its volume with it, else the
    largest lower one (by SIGMA_STEP) that keeps it, else the lowest above MIN_SIGMA_VOXELS."""
    voxels = int(np.count_nonzero(mask))
    while True:
        field = ndimage.gaussian_filter(mask.astype(np.float32), sigma, truncate=3.0)
        surface, level, volume = _volume_matched(field, voxels, sigma)
        if voxels - volume <= VOLUME_TOLERANCE * voxels or sigma * SIGMA_STEP < MIN_SIGMA_VOXELS:
            return surface, level, sigma
        sigma *= SIGMA_STEP


def _normals_of(surface: vtk.vtkPolyData) -> np.ndarray:
    points, triangles = _mesh_arrays(surface)
    return face_normals(points[triangles])


def _surface_nets(mask: np.ndarray, smoothing: float) -> vtk.vtkPolyData:
    """Surface nets, smoothed with 28 iterations at 0.5 (near VTK's default 16..50); a segment that loses more
    than NETS_VOLUME_TOLERANCE of its voxel volume to them (thin bone) gets half as many, down to 4."""
    image, voxels = arrays.image_from_array(mask.view(np.uint8)), int(np.count_nonzero(mask))
    iterations = int(round(8 + 40 * smoothing))
    while True:
        nets = vtk.vtkSurfaceNets3D()  # a new filter each time: updating one again with other iterations crashed (VTK 9.6)
        nets.SetInputData(image)
        nets.SetValue(0, 1)
        nets.SetOutputMeshTypeToTriangles()
        nets.SetSmoothing(smoothing > 0)
        nets.SetNumberOfIterations(iterations)
        nets.Update()
        surface = nets.GetOutput()
        if smoothing == 0 or iterations <= 4 or _enclosed_voxels(surface) >= (1 - NETS_VOLUME_TOLERANCE) * voxels:
            return surface
        iterations = max(4, iterations // 2)


def _contour(mask: np.ndarray, options: SurfaceOptions):
    """(triangles around a padded K, J, I mask, in that array's voxel coordinates (x=I, y=J, z=K),
    iso-level or None, Gaussian sigma in voxels).

    Flying edges smooths in image space (Gaussian, then marching cubes at the volume-matched level):
    watertight by construction and several times faster than smoothing the mesh afterwards.
    """
    level, sigma = None, 0.0
    if options.method == SurfaceMethod.SURFACE_NETS:
        surface = _surface_nets(mask, options.smoothing)
    elif options.smoothing > 0:
        surface, level, sigma = _smoothed(mask, MAX_SIGMA_VOXELS * options.smoothing)
    else:  # the voxels' own faces, half-way between voxel centres: what "no smoothing" promises
        level = 0.5
        surface = _flying_edges(vtk.vtkDiscreteFlyingEdges3D(), arrays.image_from_array(mask.view(np.uint8)), 1)
    if options.decimation > 0:
        decimate = vtk.vtkDecimatePro()
        decimate.SetInputData(surface)
        decimate.SetTargetReduction(min(options.decimation, 0.95))
        decimate.PreserveTopologyOn()
        decimate.SplittingOff()
        decimate.BoundaryVertexDeletionOff()
        decimate.Update()
        surface = decimate.GetOutput()
    return surface, level, sigma


def _mesh_arrays(surface: vtk.vtkPolyData):
    if surface.GetNumberOfPolys() == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    points = numpy_support.vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64)
    polys = surface.GetPolys()
    triangles = numpy_support.vtk_to_numpy(polys.GetConnectivityArray()).astype(np.int64).reshape(-1, 3)
    return points, triangles


@dataclass
class _Job:
    segment_id: str
    name: str
    color: tuple
    mask: np.ndarray  # padded K, J, I crop
    crop_to_world: np.ndarray  # 4x4: padded crop voxel (x=I, y=J, z=K) -> RAS world, or to the segmentation's RAS
    warp: object = None  # under a non-linear transform: the vtkGeneralTransform from the segmentation's RAS to world
    opacity: float = 1.0


def _layer_jobs(segmentation_node, segment_ids, world: np.ndarray, pad: int, warp=None):
    """One job per non-empty segment; empty segment names returned separately."""
    segmentation, display = segmentation_node.GetSegmentation(), segmentation_node.GetDisplayNode()
    layers = {}  # shared labelmap -> (array, bounding boxes by label value, array index -> world)
    # As Slicer's 3D view draws a segment (vtkMRMLSegmentationsDisplayableManager3D): this times its own 3D opacity
    overall_opacity = display.GetOpacity() * display.GetOpacity3D() if display else 1.0
    jobs, empty = [], []
    for segment_id in segment_ids:
        segment = segmentation.GetSegment(segment_id)
        labelmap = segment.GetRepresentation(BINARY_LABELMAP)
        # Segments in one shared layer return the same labelmap object: crop boxes are found once per layer.
        if labelmap not in layers and labelmap is not None and labelmap.GetPointData().GetScalars() is not None:
            values = arrays.image_array(labelmap)
            matrix = vtk.vtkMatrix4x4()
            labelmap.GetImageToWorldMatrix(matrix)
            extent = labelmap.GetExtent()
            index_shift = np.eye(4)
            index_shift[:3, 3] = extent[0::2]  # array index 0 is extent minimum, not voxel 0
            labels = values if values.dtype.kind in "iu" else values.astype(np.int32)
            layers[labelmap] = (values, ndimage.find_objects(labels.clip(0)) if values.size else [],
                           world @ arrays.matrix_to_array(matrix) @ index_shift)
        value = segment.GetLabelValue()
        if labelmap not in layers or value > len(layers[labelmap][1]) or layers[labelmap][1][value - 1] is None:
            empty.append(segment.GetName())
            continue
        values, objects, layer_to_world = layers[labelmap]
        box = objects[value - 1]
        mask = np.pad(values[box] == value, pad)
        start = np.eye(4)
        start[:3, 3] = [box[2].start - pad, box[1].start - pad, box[0].start - pad]
        jobs.append(_Job(segment_id, segment.GetName(), tuple(segment.GetColor()), mask, layer_to_world @ start, warp,
                         overall_opacity * display.GetSegmentOpacity3D(segment_id) if display else 1.0))
    return jobs, empty


def _outward(points: np.ndarray, triangles: np.ndarray):
    """(triangles, normals, enclosed mm3) with the triangles facing outward: mirroring grids and some contour
    filters wind them inward."""
    normals = face_normals(points[triangles])
    volume = signed_volume_mm3(points, triangles, normals) if len(triangles) else 0.0
    if volume < 0:
        return triangles[:, ::-1], -normals, -volume
    return triangles, normals, volume


def _vertex_sums(triangles: np.ndarray, vectors: np.ndarray, count: int) -> np.ndarray:
    """(count, 3): per vertex, the sum of a vector per triangle over the triangles it is a corner of."""
    return np.stack([np.bincount(triangles.ravel(), np.repeat(vectors[:, axis], 3), count) for axis in range(3)], 1)


def _unit(vectors: np.ndarray) -> np.ndarray:
    lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, lengths, out=np.zeros_like(vectors), where=lengths > 0)


def _through(warp, points: np.ndarray) -> np.ndarray:
    """(N, 3) points through a VTK transform, in one call (a million points take a few hundredths of a second)."""
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    source.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, np.float64), deep=True))
    target.SetDataTypeToDouble()
    warp.TransformPoints(source, target)
    return numpy_support.vtk_to_numpy(target.GetData()).astype(np.float64)


def _warped(job: _Job, points: np.ndarray, triangles: np.ndarray, normals: np.ndarray):
    """(points, triangles, normals) of an outward mesh mapped to world through the job's non-linear warp.

    The triangles keep their neighbours (watertight stays watertight) and their normals are computed anew; a
    warp turns triangles over where it folds space (its Jacobian's determinant below 0). Each vertex's probe, a
    point just outside it, tells: mapped, it lies behind the mapped triangles around the vertex where they turned
    over. All turned over is a mirror (the triangles are reversed); some is a fold, inside out in world, said so."""
    probe_mm = FOLD_PROBE_VOXELS * float(np.linalg.norm(job.crop_to_world[:3, :3], axis=0).min())
    outside = points + probe_mm * _unit(_vertex_sums(triangles, normals, len(points)))
    mapped = _through(job.warp, np.concatenate([points, outside]))
    points, outside = mapped[:len(points)], mapped[len(points):]
    normals = face_normals(points[triangles])
    facing = np.einsum("ij,ij->i", _unit(outside - points), _unit(_vertex_sums(triangles, normals, len(points))))
    if (facing > FOLD_COSINE).any() and (facing < -FOLD_COSINE).any():
        raise ExportError(f"Segment '{job.name}' lies where its segmentation's non-linear transform folds space over "
                          "itself, which would turn its mesh inside out there: correct the transform, or harden it "
                          "(Data module), and export again.")
    return (points, triangles[:, ::-1], -normals) if (facing < -FOLD_COSINE).any() else (points, triangles, normals)


def _run_job(job: _Job, options: SurfaceOptions) -> SegmentMesh:
    surface, level, sigma = _contour(job.mask, options)
    points, triangles = _mesh_arrays(surface)
    points = points @ job.crop_to_world[:3, :3].T + job.crop_to_world[:3, 3]
    triangles, normals, enclosed = _outward(points, without_degenerate(merged_as_float32(points, triangles)))
    voxel_ml = np.count_nonzero(job.mask) * abs(np.linalg.det(job.crop_to_world[:3, :3])) / 1000.0
    if job.warp is not None and len(triangles):
        points, triangles, normals = _warped(job, points, triangles, normals)
        # A non-linear map changes volume point by point (by its Jacobian's determinant), and the voxels' volume in
        # world would take that determinant at every voxel. They are scaled instead by what the map did to the mesh
        # that encloses them (the same region, to within the smoothing): the report's difference then compares like
        # with like, what contouring and smoothing did to the segment, as it does without a transform.
        if enclosed > 0:
            voxel_ml *= signed_volume_mm3(points, triangles, normals) / enclosed
    return SegmentMesh(job.segment_id, job.name, job.color, points, triangles, normals, float(voxel_ml), level, sigma,
                       job.opacity)


@dataclass
class MeshJobs:
    """What meshing needs from the scene, copied out of it (numpy crops, matrices, names, colours)."""
    jobs: list
    empty: list  # names of empty segments


def read_segments(segmentation_node, segment_ids=None, options: SurfaceOptions = SurfaceOptions(),
                  ctx: SceneContext = None) -> MeshJobs:
    """Main thread (MRML belongs to it): the segments' voxels, cropped, with their geometry.

    ctx, where views show the scene (the module): a conversion to labelmaps is made as one edit."""
    segmentation = segmentation_node.GetSegmentation()
    if segment_ids is None:
        segment_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not segment_ids:
        raise ExportError(f"Segmentation '{segmentation_node.GetName()}' has no segments: "
                          "segment something first, then export.")
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        with editing(ctx, segmentation_node) if ctx else nullcontext():  # one event per segment otherwise
            converted = segmentation.CreateRepresentation(BINARY_LABELMAP)
        if not converted:
            raise ExportError(f"Segmentation '{segmentation_node.GetName()}' cannot be converted to a labelmap: "
                              "set its reference geometry (Segmentations module) and export again.")
    world, warp = _to_world(segmentation_node)
    return MeshJobs(*_layer_jobs(segmentation_node, segment_ids, world, _padding(options), warp))


def meshes_from(segments: MeshJobs, options: SurfaceOptions = SurfaceOptions(), progress=None, each=None,
                check=None):
    """Any thread: returns (meshes, empty_segment_names); meshes in the order of the segments.

    each(mesh), when given, runs on the worker thread as soon as a mesh is made (checks and
    writing then overlap with contouring) and its result is returned in place of the mesh.
    check(), when given, runs before each segment starts and after each is done: what it raises (a cancel) stops
    the work there, segments not yet started are never started.
    """
    def work(job):
        if check:
            check()
        mesh = _run_job(job, options)
        return mesh, (each(mesh) if each and len(mesh.triangles) else mesh)

    results = []
    if progress and segments.jobs:  # the bar's clock starts with the first surface, not when it is done
        progress(0, len(segments.jobs), segments.jobs[0].name)
    with ThreadPoolExecutor(max(1, options.threads)) as pool:
        for done, result in enumerate(pool.map(work, segments.jobs), 1):
            results.append(result)
            if progress:
                progress(done, len(segments.jobs), result[0].name)
            if check:
                check()
    return ([r for m, r in results if len(m.triangles)],
            segments.empty + [m.name for m, _ in results if not len(m.triangles)])
