"""``python -m secateurs`` (and ``torchrun --nproc-per-node N -m secateurs prune ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
