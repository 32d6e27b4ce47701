"""`python -m loraforge ...`: what `accelerate launch -m loraforge train ...` runs in every worker."""

import sys

from loraforge.cli import main

sys.exit(main())
