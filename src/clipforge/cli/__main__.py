"""``python -m clipforge.cli ...`` (as torchrun runs it): the ``clipforge`` command."""

import sys

from clipforge.cli import main

if __name__ == "__main__":  # importing the module (a tool walking the package) runs nothing
    sys.exit(main())
