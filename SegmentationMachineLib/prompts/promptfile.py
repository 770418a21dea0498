"""Prompt files: the prompts of a segmentation as JSON, so sessions are reproducible and batchable.

Coordinates are RAS millimetres in the volume's own frame: the module saves its prompts mapped from Slicer's
world (what its views show) through the volume's parent transform, if any, so the CLI, which loads the series
with no transform, replays them on the same voxels.
Schema (extra keys allowed):
  {"version": 1, "segments": [{"name": "liver", "prompts": [
      {"type": "point", "ras": [x, y, z], "include": true},
      {"type": "box", "ras_min": [x, y, z], "ras_max": [x, y, z], "include": true},
      {"type": "scribble", "ras_points": [[x, y, z], ...], "include": false},
      {"type": "lasso", "ras_points": [[x, y, z], ...], "include": true}]}]}
A box with zero extent along one axis is a 2D box in that plane; a scribble is a polyline; a
lasso is a closed planar polygon.
"""

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.files import replace_private

VERSION = 1
KINDS = ("point", "box", "scribble", "lasso")


class PromptFileError(UserError):
    """A prompt file that cannot be used; the message names the offending entry."""


@dataclass(frozen=True)
class Prompt:
    kind: str
    include: bool = True
    ras: tuple = None  # point
    ras_min: tuple = None  # box
    ras_max: tuple = None
    ras_points: tuple = None  # scribble, lasso

    def as_dict(self) -> dict:
        data = {"type": self.kind}
        for key in ("ras", "ras_min", "ras_max"):
            if getattr(self, key) is not None:
                data[key] = list(getattr(self, key))
        if self.ras_points is not None:
            data["ras_points"] = [list(p) for p in self.ras_points]
        data["include"] = self.include
        return data

    def mapped(self, to_frame) -> "Prompt":
        """This prompt in another frame (to_frame maps (N, 3) points; None: this one). A box holds its mapped
        corners, and one drawn flat stays flat, across the axis it is thinnest along there."""
        if to_frame is None:
            return self
        if self.ras is not None:
            return replace(self, ras=tuple(map(float, to_frame([self.ras])[0])))
        if self.ras_points is not None:
            return replace(self, ras_points=tuple(tuple(map(float, p)) for p in to_frame(self.ras_points)))
        if self.ras_min is None:
            return self  # a reset
        corners = to_frame([[x, y, z] for x in (self.ras_min[0], self.ras_max[0])
                            for y in (self.ras_min[1], self.ras_max[1]) for z in (self.ras_min[2], self.ras_max[2])])
        low, high = corners.min(axis=0), corners.max(axis=0)
        if any(a == b for a, b in zip(self.ras_min, self.ras_max)):
            flat = int(np.argmin(high - low))
            low[flat] = high[flat] = (low[flat] + high[flat]) / 2
        return replace(self, ras_min=tuple(map(float, low)), ras_max=tuple(map(float, high)))


@dataclass
class SegmentPrompts:
    name: str
    prompts: list = field(default_factory=list)


def _point(value, where: str) -> tuple:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise PromptFileError(f"{where} must be three numbers [R, A, S] in millimetres; fix that entry.")
    return tuple(float(v) for v in value)


def _prompt(data, where: str) -> Prompt:
    if not isinstance(data, dict):
        raise PromptFileError(f"{where} must be an object with a \"type\"; fix that entry.")
    kind = data.get("type")
    if kind not in KINDS:
        raise PromptFileError(f"{where} has type {kind!r}; use one of {', '.join(KINDS)}.")
    where = f"{where} ({kind})"
    include = data.get("include", True)
    if not isinstance(include, bool):
        raise PromptFileError(f"{where}: \"include\" must be true or false.")
    if kind == "point":
        return Prompt(kind, include, ras=_point(data.get("ras"), f"{where} ras"))
    if kind == "box":
        low, high = _point(data.get("ras_min"), f"{where} ras_min"), _point(data.get("ras_max"), f"{where} ras_max")
        if sum(a == b for a, b in zip(low, high)) > 1:
            raise PromptFileError(f"{where} is flat along more than one axis: a box needs extent along two or three axes.")
        return Prompt(kind, include, ras_min=tuple(map(min, low, high)), ras_max=tuple(map(max, low, high)))
    points = data.get("ras_points")
    needed = 2 if kind == "scribble" else 3
    if not isinstance(points, list) or len(points) < needed:
        raise PromptFileError(f"{where} needs \"ras_points\", a list of at least {needed} [R, A, S] points.")
    return Prompt(kind, include, ras_points=tuple(_point(p, f"{where} ras_points[{i}]") for i, p in enumerate(points)))


def parse_prompts(data) -> list:
    """[SegmentPrompts] from the decoded JSON of a prompt file."""
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise PromptFileError(f"This is not a version {VERSION} prompt file (\"version\": {VERSION} is missing); "
                              "save the prompts again from the module.")
    segments = data.get("segments")
    if not isinstance(segments, list) or not segments:
        raise PromptFileError("The prompt file has no \"segments\" list; add at least one segment with prompts.")
    result = []
    for index, segment in enumerate(segments):
        where = f"segments[{index}]"
        if not isinstance(segment, dict) or not isinstance(segment.get("name"), str) or not segment["name"].strip():
            raise PromptFileError(f"{where} needs a \"name\" (the segment to create); fix that entry.")
        prompts = segment.get("prompts")
        if not isinstance(prompts, list):
            raise PromptFileError(f"{where} ('{segment['name']}') needs a \"prompts\" list.")
        result.append(SegmentPrompts(segment["name"], [_prompt(p, f"{where}.prompts[{i}]") for i, p in enumerate(prompts)]))
    return result


def load_prompt_file(path) -> list:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # UTF-8, also with Notepad's BOM
    except OSError as error:
        raise PromptFileError(f"Cannot read the prompt file {path} ({error.strerror}); check the path.") from None
    except ValueError as error:
        raise PromptFileError(f"{path} is not valid JSON ({error}); fix the file.") from None
    return parse_prompts(data)


def prompts_to_json(segments) -> dict:
    return {"version": VERSION, "segments": [
        {"name": s.name, "prompts": [p.as_dict() for p in s.prompts]} for s in segments]}


def save_prompt_file(path, segments):
    """Replaces path whole: Slicer's save dialog has asked the user before choosing an existing file."""
    replace_private(Path(path), json.dumps(prompts_to_json(segments), indent=2), private=False)
