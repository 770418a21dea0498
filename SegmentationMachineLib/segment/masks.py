"""CPU segmentation presets (no GPU, no weights): bone and skin masks from CT Hounsfield units.

Masks are computed in NumPy on the volume's K, J, I grid with distances in millimetres, so the
same preset behaves alike on 0.5 mm and 3 mm scans. The mask functions take K as the foot-to-head axis (they work
on axial slices): preset_mask turns a series acquired in another plane so that it is. No scene here (presets.py
makes the segment): the module computes them in a child process (preset_child.py) that starts without MRML.
"""

import inspect
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from ..core.errors import SegmentationError, UnsuitableImage
from ..core.grids import AxialView

# Scanners write values like -3024 or -2000 outside the field of view; no tissue is below this.
PADDING_BELOW_HU = -1500
# The bone preset's body only gates out the table, a centimetre or more from any bone: voxels this size do.
BODY_GATE_MM = 2.0
# Limbs hold a 15 mm deep point, tables not 5 mm: depths measured on voxels this size still tell them apart.
LIMB_GRID_MM = 5.0
# Face neighbours within a K slice (an axial one: preset_mask sees to it): outlines and marrow are decided slice by
# slice.
IN_PLANE = np.pad(ndimage.generate_binary_structure(2, 1)[None], ((1, 1), (0, 0), (0, 0)))


@dataclass(frozen=True)
class BoneOptions:
    """The bone preset's parameters: densities in HU, sizes in mm (or voxels, for partial-volume effects), each
    set by the anatomy or the scanner's physics noted beside it, so it holds from 0.5 to 3 mm voxels."""

    threshold_hu: float = 130.0  # cancellous bone starts near here; cortical bone is far above
    cortex_hu: float = 300.0  # a cortex stays above this even blurred by 3 mm voxels; enhanced organs stay below
    vessel_max_hu: float = 900.0  # iodinated blood stays below this even in an angiogram; thick cortex goes beyond it
    vessel_core_mm: float = 3.0  # lumens at least 6 mm wide (aorta, cavae, portal vein) are looked at
    vessel_max_sd_hu: float = 40.0  # blood is a fluid: its spread is image noise; cancellous bone spreads more
    vessel_wall_mm: float = 2.0  # the partial-volume rim around a lumen goes with it
    vessel_soft_share: float = 0.2  # a vessel lies in soft tissue: at least this share of the 3 mm around it is below threshold_hu
    closing_mm: float = 3.0  # in-plane: bridges gaps in a cortical ring, not a vertebral canal's openings...
    closing_voxels: float = 2.0  # ...or the one or two voxels of thin cortex that partial volume drops at coarse voxels
    max_hole_cm2: float = 20.0  # fills marrow and vertebral bodies, never a whole pelvis or chest
    canal_mm: float = 3.0  # the spinal canal opens into soft tissue through foramina wider than twice this; a cortex's gaps are narrower
    outline_hu: float = 200.0  # a bone's edge: about half way from soft tissue (40) to a thin cortex blurred to ~400
    outline_mm: float = 2.0  # how far the scanner's blur spreads an edge: surface voxels this deep may lie outside
    min_island_ml: float = 1.0  # drops speckle, calcifications and noise


@dataclass(frozen=True)
class SkinOptions:
    threshold_hu: float = -400.0  # between air (-1000) and fat (-100)
    opening_mm: float = 3.0  # detaches the table, blankets and cables before choosing the body
    min_part_radius_mm: float = 15.0  # trunk, arms and legs hold a 3 cm ball; tables and blankets do not


def _pad_width(radius_mm: float, spacing) -> list:
    return [(int(np.ceil(radius_mm / s)) + 1,) * 2 for s in spacing]


def _closing(mask, radius_mm, spacing):
    """Morphological closing with a ball of radius_mm (exact Euclidean distances, anisotropic voxels)."""
    pad = _pad_width(radius_mm, spacing)
    padded = np.pad(mask, pad)
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    return closed[tuple(slice(p[0], -p[0]) for p in pad)]


def _closing_in_plane(mask, radius_mm, spacing):
    """_closing of each K slice with a disc: it never bridges from slice to slice (across a disc space)."""
    return np.stack([_closing(part, radius_mm, spacing[1:]) for part in mask]) if len(mask) else mask


def _coarse_grid(voxel_mm: float, spacing) -> tuple:
    """(slices taking every n-th voxel, their spacing): voxels of about voxel_mm, never finer than they are."""
    steps = [max(1, int(voxel_mm // s)) for s in spacing]
    return tuple(slice(None, None, step) for step in steps), np.multiply(spacing, steps)


def _ball(radius_mm: float, spacing) -> np.ndarray:
    """Structuring element: the voxels within radius_mm of its centre (anisotropic voxels, exact distances)."""
    half = [int(radius_mm // s) for s in spacing]
    offsets = np.indices([2 * h + 1 for h in half]) - np.reshape(half, (-1,) + (1,) * len(half))
    return sum((o * s) ** 2 for o, s in zip(offsets, spacing)) <= radius_mm ** 2


def _opening(mask, radius_mm, spacing):
    """Opening with a ball; the image's ends are not background (a 3-slice scan must not erode away).
    Few-voxel balls: structuring elements are 5-50 times faster here than two whole-volume distance maps."""
    ball = _ball(radius_mm, spacing)
    return ndimage.binary_dilation(ndimage.binary_erosion(mask, ball, border_value=1), ball)


def _holes_in_plane(mask):
    """(labels, hole): mask's background labelled slice by slice (face neighbours within a K slice), and for
    each label whether it is a 2D hole, one not touching its slice's sides. One labelling of the volume:
    binary_fill_holes slice by slice costs 20 ms a 512x512 slice."""
    labels, count = ndimage.label(~mask, IN_PLANE)
    hole = np.ones(count + 1, bool)
    for axis in (1, 2):
        hole[np.take(labels, [0, -1], axis=axis)] = False
    hole[0] = False  # the mask itself
    return labels, hole


def _fill_small_holes(mask, spacing, max_area_mm2, open_space=None):
    """Fills 2D holes (in each K slice) no larger than max_area_mm2, except those mostly in open_space."""
    labels, fill = _holes_in_plane(mask)
    voxels = np.bincount(labels.ravel(), minlength=len(fill))
    fill &= voxels * spacing[1] * spacing[2] <= max_area_mm2
    if open_space is not None:
        fill &= np.bincount(labels.ravel(), open_space.ravel(), len(fill)) < voxels / 2
    return mask | fill[labels]


def _open_space(mask, spacing, radius_mm):
    """The space outside mask that a ball of radius_mm reaches from the side of the image (the soft tissue beside
    the bones) without touching mask, in 3D: a spinal canal closed in one slice by its arch opens through the
    foramina in the next; a marrow cavity leaks only through the narrower gaps in its cortex.
    On a grid of about BODY_GATE_MM voxels, where the ball is a few voxels (4 to 16 times cheaper)."""
    grid, coarse_spacing = _coarse_grid(BODY_GATE_MM, spacing)
    ball = _ball(radius_mm, coarse_spacing)
    centres, _ = ndimage.label(ndimage.binary_erosion(~mask[grid], ball, border_value=1))
    on_sides = np.unique(np.concatenate([centres[:, [0, -1]].ravel(), centres[:, :, [0, -1]].ravel()]))
    outside = np.isin(centres, on_sides[on_sides > 0])
    return _back_on_grid(ndimage.binary_dilation(outside, ball), grid, mask.shape)


def _back_on_grid(coarse, grid, shape) -> np.ndarray:
    """A mask computed on hu[grid] (_coarse_grid), each voxel repeated back onto hu's grid of this shape."""
    for axis, taken in enumerate(grid):
        coarse = np.repeat(coarse, taken.step, axis)
    return coarse[:shape[0], :shape[1], :shape[2]]


def _fill_holes(mask):
    """ndimage.binary_fill_holes(mask) through labels of the background: the same voxels, but its loop
    keeps the GIL for 200 ms at a time on a 512x512x300 scan (Slicer's GUI freezes), label's does not."""
    labels, count = ndimage.label(~mask)
    outside = np.zeros(count + 1, bool)  # background that touches the image's border
    for axis in range(mask.ndim):
        outside[np.take(labels, [0, -1], axis=axis)] = True
    outside[0] = False
    return ~outside[labels]


def _remove_small_islands(mask, spacing, min_volume_ml):
    labels, count = ndimage.label(mask, ndimage.generate_binary_structure(3, 3))
    if count == 0:
        return mask
    volumes_ml = np.bincount(labels.ravel())[1:] * float(np.prod(spacing)) / 1000.0
    keep = np.concatenate([[False], volumes_ml >= min_volume_ml])
    return keep[labels]


def _components_with(mask, seeds):
    """The 26-connected components of mask that hold at least one seed voxel."""
    labels, count = ndimage.label(mask, ndimage.generate_binary_structure(3, 3))
    keep = np.zeros(count + 1, bool)
    keep[labels[seeds & mask]] = True
    return keep[labels]


def _around(box, margin_mm: float, spacing, shape) -> tuple:
    """box (slices) grown by margin_mm on every side, inside shape."""
    grow = [before for before, _ in _pad_width(margin_mm, spacing)]
    return tuple(slice(max(b.start - g, 0), min(b.stop + g, n)) for b, g, n in zip(box, grow, shape))


def _homogeneous_centres(candidates, hu, spacing, options: BoneOptions):
    """Voxels whose neighbourhood (vessel_core_mm around) is all candidates of blood-range HU that spread less
    than vessel_max_sd_hu: the inside of a lumen, even one touching a bone of the same HU (the window across
    both spreads). Window statistics on a grid of about BODY_GATE_MM voxels (4 to 16 times cheaper)."""
    grid, coarse_spacing = _coarse_grid(BODY_GATE_MM, spacing)
    size = [2 * int(options.vessel_core_mm // s) + 1 for s in coarse_spacing]
    values = hu[grid].astype(np.float32)
    mean = ndimage.uniform_filter(values, size)
    spread = np.sqrt(np.maximum(ndimage.uniform_filter(values * values, size) - mean * mean, 0))
    centres = (ndimage.minimum_filter(candidates[grid], size) & (spread < options.vessel_max_sd_hu)
               & (mean < options.vessel_max_hu))
    return _back_on_grid(centres, grid, hu.shape) & candidates


def _label_statistics(values, labels, count):
    """(mean, standard deviation) of values under each label 1..count, from the labelled voxels alone:
    ndimage's versions make whole-volume float64 temporaries (1.3 GB more on a 512x512x640 scan)."""
    labelled = labels > 0
    which, sample = labels[labelled], values[labelled].astype(np.float64)
    voxels = np.bincount(which, minlength=count + 1)[1:]
    mean = np.bincount(which, sample, count + 1)[1:] / voxels
    square = np.bincount(which, sample * sample, count + 1)[1:] / voxels
    return mean, np.sqrt(np.maximum(square - mean * mean, 0))


def _vessel_lumens(candidates, hu, spacing, options: BoneOptions):
    """Contrast-filled lumens: thick, homogeneous regions of blood-range HU lying in soft tissue,
    with their partial-volume rim.

    Cancellous bone has the same HU as enhanced blood, but it mixes trabeculae and marrow (a spread of
    50-80 HU even at 3 mm voxels), while blood spreads only by the image noise (10-30 HU); and where
    marrow is homogeneous (young red marrow, a femoral head's) cortex or more marrow surrounds it, while a
    vessel lies in soft tissue. An angiogram's arteries (500-800 HU) are as bright as a blurred cortex:
    homogeneity and their surroundings still tell them apart.
    """
    labels, count = ndimage.label(_homogeneous_centres(candidates, hu, spacing, options))
    lumens = np.zeros_like(candidates)
    if count == 0:
        return lumens
    level, spread = _label_statistics(hu, labels, count)
    boxes, voxel_ml = ndimage.find_objects(labels), float(np.prod(spacing)) / 1000.0
    ball, wall = _ball(options.vessel_core_mm, spacing), _ball(options.vessel_wall_mm, spacing)
    # Each homogeneous centre is looked at in its own neighbourhood: its core (the centre grown by
    # vessel_core_mm, within its HU) and the shell around that.
    for index in np.flatnonzero(spread < options.vessel_max_sd_hu):
        near = _around(boxes[index], 2 * options.vessel_core_mm, spacing, labels.shape)
        within = candidates[near] & (hu[near] < level[index] + 3 * spread[index])
        core = ndimage.binary_dilation(labels[near] == index + 1, ball) & within
        if core.sum() * voxel_ml < options.min_island_ml:
            continue
        shell = ndimage.binary_dilation(core, ball) & ~core
        if not shell.any() or (hu[near][shell] <= options.threshold_hu).mean() < options.vessel_soft_share:
            continue  # marrow: wrapped in cortex, or in more marrow
        # Its rim lies between the lumen's HU and the tissue's: nothing brighter than the lumen, so never bone.
        parts, _ = ndimage.label(ndimage.binary_dilation(core, wall) & within)  # face-connected: not across a cortex
        lumens[near] |= np.isin(parts, parts[core]) & (parts > 0)
    return lumens


def _enclosed_lumens(lumens, mask):
    """The lumens lying mostly in mask's in-plane holes: homogeneous marrow found where the bone encloses it
    (an osteoporotic vertebral body's, which discs above and below leave with soft tissue in its shell);
    a vessel lies beside bones, not inside them."""
    parts, count = ndimage.label(lumens, ndimage.generate_binary_structure(3, 3))
    if count == 0:
        return lumens
    labels, hole = _holes_in_plane(mask)
    voxels = np.bincount(parts.ravel(), minlength=count + 1)
    inside = np.bincount(parts.ravel(), hole[labels].ravel(), count + 1) >= voxels / 2
    inside[0] = False
    return inside[parts]


def _steps(progress, total: int):
    """step(name): progress(steps done, total, name of the step starting); nothing without progress."""
    done = iter(range(total))
    return lambda name: progress(next(done), total, name) if progress else None


def _body_gate(hu, spacing) -> np.ndarray:
    """body_mask computed on a grid of about BODY_GATE_MM voxels (4 to 16 times cheaper), back on hu's grid."""
    grid, coarse_spacing = _coarse_grid(BODY_GATE_MM, spacing)
    return _back_on_grid(body_mask(hu[grid], coarse_spacing), grid, hu.shape)


def _outline(mask, hu, spacing, options: BoneOptions):
    """mask without the blur around it: a cortex's brightness spreads outline_mm into the soft tissue beside it,
    so voxels there below outline_hu go, where reached from outside the mask without crossing brighter bone
    (the marrow behind a thin cortex stays)."""
    depth = np.stack([ndimage.distance_transform_edt(np.pad(part, 1), sampling=spacing[1:])[1:-1, 1:-1]
                      for part in mask])
    blurred = mask & (hu < options.outline_hu) & (depth <= options.outline_mm)
    labels, count = ndimage.label(blurred, IN_PLANE)
    outer = np.zeros(count + 1, bool)
    outer[labels[ndimage.binary_dilation(~mask, IN_PLANE) & blurred]] = True
    outer[0] = False
    return mask & ~outer[labels]


def bone_mask(hu: np.ndarray, spacing, options: BoneOptions = BoneOptions(), progress=None) -> np.ndarray:
    """Bone inside the body: candidates above threshold_hu, minus the table (outside the body mask),
    minus contrast-filled vessel lumens (thick and homogeneous; those the bone encloses are marrow), keeping only
    the pieces that hold dense cortex (which drops enhanced organs and small vessels); then closed and marrow filled
    slice by slice (so disc spaces between vertebrae stay open) but not the spinal canal, its edge moved to
    outline_hu, islands removed.
    Works on the bounding box of the candidates only.
    """
    step = _steps(progress, 7)
    step("body")
    candidates = (hu > options.threshold_hu) & _body_gate(hu, spacing)
    result = np.zeros(hu.shape, bool)
    if not candidates.any():
        return result
    # Everything after this looks at most vessel_core_mm (a lumen's shell) beyond a candidate.
    box = _around(ndimage.find_objects(candidates.astype(np.uint8))[0], options.vessel_core_mm, spacing, hu.shape)
    candidates, hu = candidates[box], hu[box]
    step("vessels")
    lumens = _vessel_lumens(candidates, hu, spacing, options)
    step("cortex")
    mask = _components_with(candidates & ~lumens, hu > options.cortex_hu)
    if not mask.any():
        return result
    step("closing")
    mask = _closing_in_plane(mask, max(options.closing_mm, options.closing_voxels * max(spacing[1:])), spacing)
    step("marrow")
    marrow = _enclosed_lumens(lumens, mask)
    mask, lumens = mask | marrow, lumens & ~marrow
    mask = _fill_small_holes(mask, spacing, options.max_hole_cm2 * 100, _open_space(mask, spacing, options.canal_mm))
    mask &= ~lumens
    step("outline")
    mask = _outline(mask, hu, spacing, options)
    step("islands")
    result[box] = _remove_small_islands(mask, spacing, options.min_island_ml)
    return result


def body_mask(hu: np.ndarray, spacing, options: SkinOptions = SkinOptions(), progress=None) -> np.ndarray:
    """The body and every part of it thick enough to be a limb (arms beside the trunk included);
    the table, blankets and cables are thinner, and air and scanner padding are below the threshold."""
    step = _steps(progress, 3)
    step("opening")
    mask = (hu > options.threshold_hu) & (hu > PADDING_BELOW_HU)
    if not mask.any():
        return mask
    mask = _opening(mask, options.opening_mm, spacing)
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    step("limbs")
    # Depth on a coarser grid (LIMB_GRID_MM): the distance map costs 10-100 times less.
    grid, coarse_spacing = _coarse_grid(LIMB_GRID_MM, spacing)
    depth = ndimage.distance_transform_edt(mask[grid], sampling=coarse_spacing)
    keep = np.zeros(count + 1, bool)
    keep[labels[grid][depth >= options.min_part_radius_mm]] = True
    keep[np.argmax(np.bincount(labels.ravel())[1:]) + 1] = True  # a thin scan's body still counts
    mask = keep[labels]
    step("cavities")
    mask = _fill_small_holes(mask, spacing, np.inf)  # lungs and bowel gas are inside the body
    return _fill_holes(mask)


@dataclass(frozen=True)
class Preset:
    name: str
    segment_name: str
    color: tuple  # RGB 0..1
    description: str
    mask: Callable
    # Its segment's 3D opacity (views, .glb) where the segmentation holds other segments too: the body surface
    # encloses them all, and opaque it would hide them.
    opacity_3d_with_others: float = 1.0


PRESETS = {
    "bone": Preset("bone", "Bone", (0.945, 0.839, 0.569),
                   "Bone from CT: threshold inside the body, contrast-filled vessels and the table removed, marrow filled", bone_mask),
    "skin": Preset("skin", "Skin", (0.694, 0.478, 0.396),
                   "Outer body surface from CT (arms included): table and air removed, cavities filled", body_mask,
                   opacity_3d_with_others=0.4),
}


def get_preset(preset_name: str) -> Preset:
    if preset_name not in PRESETS:
        raise SegmentationError(f"There is no preset '{preset_name}': choose one of {', '.join(PRESETS)}.")
    return PRESETS[preset_name]


def preset_parameters(preset_name: str) -> dict:
    """Every parameter the preset runs with (its mask function's default options), for reports."""
    return asdict(inspect.signature(get_preset(preset_name).mask).parameters["options"].default)


FOR_OTHER_IMAGES = "for MR or other images use the AI prompt tools"
# A preset's mask this share of the image is not anatomy: the image has no air (not Hounsfield units, or a crop
# inside the body). Not 'no value below -500' in _check_image: a CT cropped to the spine has none, and its bones
# are modelled rightly.
WHOLE_IMAGE_SHARE = 0.98
# DICOM modalities that may hold a CT in Hounsfield units ("OT": none given, or a CT's secondary capture)
CT_MODALITIES = ("CT", "OT")


def check_modality(series_name: str, modality: str, advice: str = FOR_OTHER_IMAGES):
    """Refuses, before it is loaded, a series the presets would turn into a junk model (an MR's air is above the
    skin threshold: its 'skin' is the whole box). series_name: DicomSeries.name, which starts with the modality."""
    if modality and modality not in CT_MODALITIES:
        raise UnsuitableImage(f"Series {series_name} is not a CT: the presets need a CT in Hounsfield units; "
                              f"{advice}.")


def _check_image(hu: np.ndarray, volume_name: str):
    """The same for a volume whose modality is not known (a NIfTI file, a volume in Slicer's scene)."""
    if min(hu.shape) < 2:
        raise UnsuitableImage(f"'{volume_name}' is a single slice (a localizer or a screenshot?): a 3D model needs a "
                              "stack of slices.")
    if hu.min() >= 0:  # air is -1000 HU, fat below 0; raw scanner values and MR start at 0
        raise UnsuitableImage(f"'{volume_name}' has no value below 0, so it is not a CT in Hounsfield units (a CT "
                              f"masked with fill value 0: mask it with -1000 instead); {FOR_OTHER_IMAGES}.")


def preset_mask(preset_name: str, hu: np.ndarray, spacing, volume_name: str, progress=None,
                ijk_to_ras=None) -> np.ndarray:
    """The preset's mask; touches no scene, so it may run on a worker thread (with a copy of hu).
    progress(done, total, step) as the preset's steps start, and (1, 1, preset) at the end.
    ijk_to_ras: hu's grid. The masks close, fill and outline axial slices (a disc space lies between two of them,
    a marrow cavity inside one): a sagittal or coronal series is seen as axial for them, so the same anatomy gives the
    same voxels whatever plane it was acquired in. None: hu's K axis runs from foot to head."""
    preset = get_preset(preset_name)
    _check_image(hu, volume_name)
    axial = AxialView() if ijk_to_ras is None else AxialView.of(ijk_to_ras)
    mask = np.ascontiguousarray(axial.back(preset.mask(axial.view(hu), axial.spacing(spacing), progress=progress)))
    if progress:
        progress(1, 1, preset.name)
    if not mask.any():
        raise SegmentationError(
            f"The {preset.name} preset found nothing in '{volume_name}': it expects a CT in "
            f"Hounsfield units; {FOR_OTHER_IMAGES}.")
    share = float(np.count_nonzero(mask)) / mask.size
    if share >= WHOLE_IMAGE_SHARE:  # e.g. skin from a z-scored MR (-0.9..3.1): every voxel is above -400 HU
        raise UnsuitableImage(
            f"The {preset.name} preset took {share:.0%} of '{volume_name}', the whole image: it expects a CT in "
            "Hounsfield units with air around the body (an MR or intensity-normalised image has none, nor has a CT "
            f"cropped inside the body); {FOR_OTHER_IMAGES}.")
    return mask
