"""``python -m sparse_avatar.train`` / ``torchrun -m sparse_avatar.train``: see training/train.py."""
import sys

from .training.train import main

if __name__ == "__main__":
    sys.exit(main())
