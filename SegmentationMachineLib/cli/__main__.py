"""`python -m SegmentationMachineLib.cli`: the same as the segmentation-machine command."""

import sys

from .main import main

sys.exit(main())
