"""``python -m alpsprune`` (and ``torchrun -m alpsprune``)."""

import sys

from .cli.main import main

sys.exit(main())
