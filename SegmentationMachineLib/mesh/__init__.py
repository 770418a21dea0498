"""Segments to closed meshes, their checks, STL/OBJ/3MF writers, the one-click export, OrcaSlicer."""
