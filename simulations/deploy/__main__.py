"""``python -m simulations.deploy <command>``."""

import sys

from simulations.deploy.cli import main

sys.exit(main())
