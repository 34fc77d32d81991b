"""Training: datasets and preprocessing, the one trainer, the five curriculum stages and the torchrun
entry (``python -m sparse_avatar.train``). The Avatar World generator, the test world, is its own
package (``sparse_avatar.avatar_world``) and writes this package's shards.

See README.md in this folder for the map. Submodules are imported explicitly (``from
sparse_avatar.training.trainer import Trainer``) so importing the package stays cheap.
"""
