"""`python -m tinyonn ...`, and so `torchrun --nproc_per_node N -m tinyonn probe|train ...`: the
`tinyonn` command (`tinyonn.cli`)."""

import sys

from tinyonn.cli import main

if __name__ == "__main__":
    sys.exit(main())
