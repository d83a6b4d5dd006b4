"""`python -m lmmr1 ...` == the `lmmr1` console script (the study driver runs its steps this way)."""

import sys

from lmmr1.cli import main

sys.exit(main())
