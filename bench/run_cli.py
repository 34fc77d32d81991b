"""Run one of the pack's module entry points from a bare checkout (a GPU box without PyAV or
`pip install -e .`): ``python bench/run_cli.py sparse_avatar.train --config world ...`` is
``python -m sparse_avatar.train --config world ...`` with the package exposed by ``_checkout``
(its ``__init__``, which loads the ComfyUI node layer and the media stack, is not run)."""
import runpy
import sys

import _checkout  # noqa: F401  (exposes the repository as `sparse_avatar`)

# Guarded: spawn workers (Avatar World shards) re-import this file as __mp_main__; they need the
# `_checkout` import above, not a second run of the command.
if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].startswith("sparse_avatar."):
        raise SystemExit("usage: python bench/run_cli.py sparse_avatar.MODULE [arguments...]")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    # alter_sys=False: __main__ stays this file, which is what spawn workers re-import.
    runpy.run_module(module, run_name="__main__", alter_sys=False)
