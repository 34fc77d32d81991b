"""`python -m sparse_avatar ...`: see cli.py."""
import sys

from .cli import main

sys.exit(main())
