"""The one exception type for problems the user can fix (bad file, wrong setting, missing face).

Its message says what was wrong and what to do. The CLI prints it as one line; ComfyUI shows it in
the node's error box. Library code converts low-level failures (PyAV, torch, safetensors) into
this type at the boundary where the user's input is read, so no traceback from deep inside a
library reaches the user.
"""


class UserFacingError(ValueError):
    """Bad input or settings; the message tells the user what is wrong and what to do."""
