"""``python -m clipforge ...``: the ``clipforge`` command, as ``python -m clipforge.cli`` runs it."""

import sys

from clipforge.cli import main

if __name__ == "__main__":  # importing the module (a tool walking the package) runs nothing
    sys.exit(main())
