"""`python -m loraforge ...`: what `accelerate launch -m loraforge train ...` runs in every worker."""

import sys

from .cli import main

sys.exit(main())
