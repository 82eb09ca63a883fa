"""`python -m vicuna_exp` is `vicuna-exp`."""

import sys

from vicuna_exp.cli import main

sys.exit(main())
