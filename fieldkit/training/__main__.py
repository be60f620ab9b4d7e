"""``python -m fieldkit.training``: see :mod:`fieldkit.training._cli`."""

import sys

from ._cli import main

sys.exit(main())
