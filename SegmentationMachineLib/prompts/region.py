"""Which part of the volume the server gets: the region of interest, in the volume's K, J, I voxels.

RunPod's proxy ends a request after 100 s and refuses bodies near 100 MB, and a 512x512x1000 CT
packs to 185-280 MB (blosc2 zstd as the upstream client sends it; benchmarks/prompt_speed.py). So
one upload carries a region: the body's bounding box (air cut away; everything, for a volume
without air in HU), as many slices of it as one request may carry, centred on the body. A prompt
outside it, or near one of its cut faces, sends a new region around the prompt: the old one grown,
or moved where growing would not fit. A result that reaches a face of the region where it cuts the
volume (a vessel running on) was cut there by the server: the prompt runs again on a region around the
result and the prompt, reaching past those faces as far as one request carries (narrower in-plane than
the body, so more slices fit). Boxes are (2, 3) arrays: low (inclusive) and high (exclusive) per axis.
"""

from dataclasses import dataclass

import numpy as np

from ..core.errors import UserError

SAMPLE_SLABS = 8  # slabs of the body packed to estimate the compression before the first upload
SAFETY = 1.15  # the estimate's margin: other slices may pack worse than the sampled ones


class RegionTooLarge(UserError):
    """Even the least region a prompt needs does not fit in one request."""


@dataclass
class Limits:
    """What one upload may be: RunPod's proxy caps bodies near 100 MB and ends requests after 100 s."""

    request_bytes: int = 90_000_000  # below the cap reported near 100 MB
    request_s: float = 30.0  # the wait for an upload the user accepts (and well inside the proxy's 100 s)
    uplink_bytes_per_s: float = 20e6 / 8  # a home uplink of 20 Mbit/s, until told otherwise
    context: int = 96  # voxels of image around a prompt: half the official model's 192-voxel patch
    edge: int = 16  # a prompt nearer than this to a cut face of the region moves the region
    body_hu: float = -500.0  # above this is body (and table); below, air and padding
    body_margin: int = 16

    @property
    def budget_bytes(self) -> float:
        return min(self.request_bytes, self.uplink_bytes_per_s * self.request_s)


def amount(count: float) -> str:
    """Bytes for a message: '12.3 MB', or '45 kB' below a tenth of a megabyte."""
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count / 1e3:.0f} kB"


def slices(box: np.ndarray) -> tuple:
    return tuple(slice(int(lo), int(hi)) for lo, hi in box.T)


def size(box: np.ndarray) -> np.ndarray:
    return box[1] - box[0]


def body_box(volume: np.ndarray, limits: Limits) -> np.ndarray:
    """The box of voxels above body_hu, from every 4th voxel on each axis (cheap on a 1000-slice CT),
    grown by body_margin; the whole volume when nothing is above it."""
    shape = np.array(volume.shape)
    step = 4 if volume.size > 1 << 22 else 1
    body = volume[::step, ::step, ::step] > limits.body_hu
    found = [np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(len(f) == 0 for f in found):
        return np.array([[0, 0, 0], shape])
    low = np.array([f[0] * step for f in found]) - limits.body_margin
    high = np.array([f[-1] * step + step for f in found]) + limits.body_margin
    return np.array([low.clip(0), high.clip(max=shape)])


def covers(region: np.ndarray, footprint: np.ndarray, shape, edge: int) -> bool:
    """footprint lies inside region, at least edge voxels from each face that cuts the volume."""
    low = region[0] + np.where(region[0] > 0, edge, 0)
    high = region[1] - np.where(region[1] < np.array(shape), edge, 0)
    return bool((footprint[0] >= low).all() and (footprint[1] <= high).all())


def cut_faces(region: np.ndarray, shape, box: np.ndarray, after: np.ndarray, before: np.ndarray) -> np.ndarray:
    """(2, 3) booleans: the faces of region (low and high, per axis) that cut the volume and that a result reaches
    with voxels it added. box: its changed box in the region's voxels; after, before: the mask there with and
    without the result (only their voxels on the faces are read)."""
    def added(axis, index):
        return ((np.take(after, index, axis) > 0) & ~np.take(before, index, axis)).any()

    reached = np.zeros((2, 3), bool)
    for axis in range(3):
        reached[0, axis] = box[0, axis] == 0 < region[0, axis] and added(axis, 0)
        reached[1, axis] = box[1, axis] == size(region)[axis] and region[1, axis] < shape[axis] and added(axis, -1)
    return reached


class Planner:
    """Chooses regions for one volume within the limits, from an estimate of the bytes a voxel takes
    on the wire (sampled, then measured on each upload)."""

    def __init__(self, volume: np.ndarray, limits: Limits, pack):
        self.shape, self.limits = np.array(volume.shape), limits
        self.body = body_box(volume, limits)
        self.budget = limits.budget_bytes
        self.wire_per_voxel = _sampled_bytes_per_voxel(volume, self.body, pack) * SAFETY

    def first(self) -> np.ndarray:
        """The body's box, cut to the slices one request carries around the body's centre."""
        centre = (self.body[0] + self.body[1]) // 2
        need = self._around(np.array([centre, centre + 1]))
        return self.fit(need, _union(self.body, need))

    def toward(self, region, footprint: np.ndarray) -> np.ndarray:
        """The region to send for a prompt's voxel box: region grown to hold it with its context, or moved
        there where growing does not fit."""
        need = self._around(footprint)
        return self.fit(need, need if region is None else _union(region, need))

    def beyond(self, result: np.ndarray, footprint: np.ndarray, cut: np.ndarray) -> np.ndarray:
        """The region to run a prompt again in, whose result (its box) reached the faces cut (cut_faces) of the
        region sent: the result and the prompt's footprint with their context, reaching past those faces as far as
        one request carries; RegionTooLarge where even that context does not fit."""
        need = self._around(_union(result, footprint))
        return self.fit(need, np.where(cut, np.array([np.zeros(3, int), self.shape]), need))

    def _around(self, box: np.ndarray) -> np.ndarray:
        context = self.limits.context
        return np.array([(box[0] - context).clip(0), (box[1] + context).clip(max=self.shape)])

    def fit(self, need: np.ndarray, want: np.ndarray) -> np.ndarray:
        """The largest box from need towards want within the budget: all of want's J and I first (organs
        reach the body's sides), then as many of its slices as fit, centred on need's."""
        voxels = self.budget / self.wire_per_voxel
        if np.prod(size(need)) > voxels:
            raise RegionTooLarge(
                f"The region a prompt needs ({'x'.join(map(str, size(need)[::-1]))} voxels, about "
                f"{amount(np.prod(size(need)) * self.wire_per_voxel)} packed) is more than one upload may carry "
                f"({amount(self.budget)}: the proxy's limit, or {self.limits.request_s:g} s at "
                f"{self.limits.uplink_bytes_per_s * 8 / 1e6:g} Mbit/s): crop or resample the volume, or reach the "
                "server without the proxy (an SSH tunnel to it, or its address on your own network).")
        t = _largest(lambda t: size(need)[0] * np.prod(size(_between(need, want, t))[1:]) <= voxels)
        region = _between(need, want, t)
        count = int(np.clip(voxels // np.prod(size(region)[1:]), size(need)[0], size(want)[0]))
        start = int(np.clip((need[0, 0] + need[1, 0]) // 2 - count // 2, want[0, 0], want[1, 0] - count))
        start = min(max(start, need[1, 0] - count), need[0, 0])
        region[:, 0] = [start, start + count]
        return region

    def learn(self, voxels: int, sent: int):
        """After an upload of voxels that took sent bytes: the estimate for the next region."""
        self.wire_per_voxel = sent / voxels * SAFETY

    def refused(self, sent: int):
        """The proxy refused a body of sent bytes (too large, or too slow at this uplink): half of it next."""
        self.budget = min(self.budget, sent / 2)


def _union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.minimum(a[0], b[0]), np.maximum(a[1], b[1])])


def _between(need, want, t: float) -> np.ndarray:
    """The box a fraction t of the way from need out to want, on every side."""
    return np.array([need[0] - np.floor(t * (need[0] - want[0])), need[1] + np.floor(t * (want[1] - need[1]))]
                    ).astype(int)


def _largest(fits) -> float:
    """The largest t in [0, 1] with fits(t), by bisection (fits(0) holds)."""
    if fits(1.0):
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _sampled_bytes_per_voxel(volume: np.ndarray, body: np.ndarray, pack) -> float:
    """Packed bytes per voxel of a few two-slice slabs of the body, spread over its slices."""
    k_low, k_high = body[:, 0]
    starts = np.unique(np.linspace(k_low, max(k_low, k_high - 2), SAMPLE_SLABS).astype(int))
    in_plane = slices(body)[1:]
    sample = np.concatenate([volume[k:k + 2][(slice(None), *in_plane)] for k in starts])
    return len(pack(sample[np.newaxis])) / sample.size
