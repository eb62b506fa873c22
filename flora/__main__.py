"""``python -m flora <stage> [<verb>]``: the ``flora`` command, for a Python without its console script
(and for ``torchrun -m flora train ...``)."""

import sys

from flora.cli import main

sys.exit(main())
