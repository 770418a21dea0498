"""Shared by every capability: errors, the scene, numpy/VTK arrays, safe files, secrets."""
