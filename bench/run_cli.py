"""Run one of the pack's module entry points from a bare checkout (a GPU box without PyAV or
`pip install -e .`): ``python bench/run_cli.py sparse_avatar.train --config world ...`` is
``python -m sparse_avatar.train --config world ...`` with the package exposed by ``_checkout``
(its ``__init__``, which loads the ComfyUI node layer and the media stack, is not run)."""
import runpy
import sys

import _checkout  # noqa: F401  (exposes the repository as `sparse_avatar`)

if len(sys.argv) < 2 or not sys.argv[1].startswith("sparse_avatar."):
    raise SystemExit("usage: python bench/run_cli.py sparse_avatar.MODULE [arguments...]")
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
