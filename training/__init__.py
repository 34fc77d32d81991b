"""Training: datasets and preprocessing, the one trainer, the five curriculum stages, the torchrun
entry (``python -m sparse_avatar.train``), and the Avatar World generator (``training.world``).

See README.md in this folder for the map. Submodules are imported explicitly (``from
sparse_avatar.training.trainer import Trainer``) so importing the package stays cheap.
"""
