"""segmentation-machine, the command line."""
