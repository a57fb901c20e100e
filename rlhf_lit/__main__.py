"""``python -m rlhf_lit``: the ``rlhf-lit`` command."""

import sys

from rlhf_lit.apps.cli import main

sys.exit(main())
