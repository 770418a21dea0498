"""SegmentationMachine's library: everything the Slicer module and the CLI do, without Qt or Slicer globals.

Functions take the scene and module logics as arguments (see scene.SceneContext), so the same
code runs inside 3D Slicer, in the headless CLI and in pytest.
"""

__version__ = "0.1.0"
