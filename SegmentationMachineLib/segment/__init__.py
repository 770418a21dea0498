"""CPU presets and segmentation files."""
