"""`python -m genloop.cli`: the same as the `genloop` command."""

import sys

from genloop.cli import main

sys.exit(main())
