"""``python -m clipforge.cli ...`` (as torchrun runs it): the ``clipforge`` command."""

import sys

from clipforge.cli import main

sys.exit(main())
