"""How the model path reports an exception: by its first line (train/errors.py reports a run's failures with it)."""


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message; its type's name when the message is empty (a bare `assert`)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
