"""``python -m nbdvma``: the same as the ``nbdvma`` console script."""

import sys

from nbdvma.cli import main

sys.exit(main())
