"""The AI prompts sent for the segment being edited, shown in the views as markups, read-only.

Once placed, a prompt's own markup is cleared (the tool takes the next one), so this shows what the segment was made
from: points as points, boxes as box outlines, scribbles and lassos as the curves sent. Include prompts are sky blue
and exclude ones orange (Okabe and Ito's colour-blind-safe pair: they differ in lightness and along the blue-yellow
axis that red-green colour blindness keeps), and an exclude point is a minus where an include one is a plus.

What is shown as sent is the session's undo history (InteractiveSession.prompts_of): a prompt is sent once its result
is written (one that changed nothing too: the server keeps it), so one that failed or was cancelled never is; Undo
takes the last one away, Redo brings it back, a reset or another volume clears them, and another segment shows its own
(none until prompted into). The prompts are kept in the volume's own RAS (as prompt files hold them), so the markups
sit under the volume's parent transform and land where the views show the volume's voxels.

A prompt placed is shown at once as waiting (queued, or on the server): its own kind and polarity colour, faint
(WAITING_OPACITY), so the click does not vanish for the seconds a busy server takes, and what it was (include or
exclude) stays readable; it is in the views' world RAS, as placed. Once its result is in it is shown as sent; failed
or cancelled, it goes.

Each markup is locked, has a fixed number of control points, is hidden from editors (the Markups module, the Data
tree and Save list none of them) and is not saved with the scene. Slicer's Markups logic makes every markups node
added the active place node (vtkSlicerMarkupsLogic::OnMRMLSceneNodeAdded, 5.10): the one that was active is given
back, or the next click of a tool (or of Slicer's own toolbar) would try to land in a locked prompt.
"""

from ..prompts.promptfile import Prompt

INCLUDE_COLOUR = (0.337, 0.706, 0.914)  # Okabe-Ito sky blue
EXCLUDE_COLOUR = (0.902, 0.624, 0.0)  # Okabe-Ito orange
NAME = "AI prompt sent"  # the nodes' names start so: hidden from editors, but a Python console user finds them
WAITING_NAME = "AI prompt waiting"
WAITING_OPACITY = 0.35  # faint over the scan, yet its colour (include or exclude) still tells
CLASSES = {"point": "vtkMRMLMarkupsFiducialNode", "box": "vtkMRMLMarkupsROINode",
           "scribble": "vtkMRMLMarkupsCurveNode", "lasso": "vtkMRMLMarkupsClosedCurveNode"}


class PromptTrail:
    """Main thread. show() makes the markups match the prompts sent and those waiting, changing only what differs
    from what is shown (its usual change is one prompt more or less at the end)."""

    def __init__(self, scene, app_logic=None):
        self.scene = scene
        self.app_logic = app_logic  # its selection node holds the active place node; None: no Markups logic runs
        self.shown = []  # [(the Prompt, its markups node)], in the order sent
        self.waiting = []  # [(the Prompt, its markups node)] placed and not in yet, in the order placed
        self._frame = None  # the ID of the transform the markups sent are under

    @property
    def nodes(self) -> list:
        """The markups of the prompts sent."""
        return [node for _prompt, node in self.shown]

    @property
    def waiting_nodes(self) -> list:
        return [node for _prompt, node in self.waiting]

    def show(self, prompts, volume_node=None, waiting=()):
        """prompts (Prompt, in volume_node's own RAS) as markups under volume_node's parent transform; waiting
        (Prompt, in world RAS, as placed) faint."""
        transform = volume_node.GetParentTransformNode() if volume_node is not None else None
        frame = transform.GetID() if transform is not None else None
        if frame != self._frame:  # the volume moved under another transform: all shown anew
            self._drop(self.shown, 0)
            self._frame = frame
        sent = self._unchanged(self.shown, prompts)
        # Waiting prompts leave from the front (the one on the server is done) and come in at the end.
        gone = [shown for shown in self.waiting if not any(shown[0] is p for p in waiting)]
        placed = [p for p in waiting if not any(p is prompt for prompt, _node in self.waiting)]
        if sent == len(prompts) == len(self.shown) and not gone and not placed:
            return
        self._drop(self.shown, sent)
        for _prompt, node in gone:
            self._remove(node)
        self.waiting = [shown for shown in self.waiting if not any(shown is g for g in gone)]
        selection = self.app_logic.GetSelectionNode() if self.app_logic is not None else None
        active = (selection.GetActivePlaceNodeClassName(), selection.GetActivePlaceNodeID()) if selection else None
        try:
            for prompt in prompts[sent:]:
                self.shown.append((prompt, self._add(prompt, frame)))
            for prompt in placed:
                self.waiting.append((prompt, self._add(prompt, None, waiting=True)))
        finally:
            if active is not None:
                selection.SetReferenceActivePlaceNodeClassName(active[0])
                selection.SetActivePlaceNodeID(active[1])

    @staticmethod
    def _unchanged(shown: list, prompts) -> int:
        """How many of shown, from the first, are still prompts'. The history keeps each Prompt (and the panel's queue
        each one placed): identity says it is the same prompt."""
        same = 0
        while same < min(len(prompts), len(shown)) and shown[same][0] is prompts[same]:
            same += 1
        return same

    def _drop(self, shown: list, keep: int):
        for _prompt, node in shown[keep:]:
            self._remove(node)
        del shown[keep:]

    def clear(self):
        """Disconnect, reset, Close Scene (before the scene clears: after, the nodes are gone already)."""
        self._drop(self.shown, 0)
        self._drop(self.waiting, 0)

    def _remove(self, node):
        if node.GetScene() is self.scene:  # Close Scene may have removed it
            self.scene.RemoveNode(node)

    def _add(self, prompt: Prompt, frame, waiting: bool = False):
        polarity = "include" if prompt.include else "exclude"
        name = f"{WAITING_NAME}: " if waiting else f"{NAME} {len(self.shown) + 1}: "
        node = self.scene.AddNewNodeByClass(CLASSES[prompt.kind], f"{name}{polarity} {prompt.kind}")
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        was_modifying = node.StartModify()
        if frame is not None:
            node.SetAndObserveTransformNodeID(frame)
        if prompt.kind == "point":
            node.AddControlPoint(*prompt.ras)
        elif prompt.kind == "box":
            node.SetCenter(*[(low + high) / 2 for low, high in zip(prompt.ras_min, prompt.ras_max)])
            node.SetSize(*[high - low for low, high in zip(prompt.ras_min, prompt.ras_max)])  # a flat box: 0 across
        else:
            node.SetCurveTypeToLinear()  # the points are the spline the server got: drawn as they are, not smoothed
            for point in prompt.ras_points:
                node.AddControlPoint(*point)
        node.SetLocked(True)
        node.SetFixedNumberOfControlPoints(True)  # nothing can be added to it, or taken
        node.EndModify(was_modifying)
        self._style(node, prompt, waiting)
        return node

    @staticmethod
    def _style(node, prompt: Prompt, waiting: bool = False):
        if node.GetDisplayNode() is None:  # Slicer's Markups logic makes one with the user's defaults; else here
            node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSaveWithScene(False)
        display.SetHideFromEditors(True)
        colour = INCLUDE_COLOUR if prompt.include else EXCLUDE_COLOUR
        for setter in (display.SetColor, display.SetSelectedColor, display.SetActiveColor):
            setter(*colour)  # control points are selected when made: both colours, or the polarity would depend on it
        display.SetPointLabelsVisibility(False)
        display.SetPropertiesLabelVisibility(False)
        display.SetHandlesInteractive(False)
        if waiting:  # faint until its result is in: points, curves and the box's outline alike
            display.SetOpacity(WAITING_OPACITY)
        if prompt.kind == "point":
            display.SetGlyphType(display.Cross2D if prompt.include else display.Dash2D)
        else:  # the outline only: no glyph at each curve point or at the box's centre, no fill over the scan
            display.SetGlyphScale(0.0)
            display.SetGlyphSize(0.0)
            display.SetFillVisibility(False)
