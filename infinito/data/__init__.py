"""The data stages, ``download`` (raw text splits) and ``tokenize`` (GPT-2 BPE memmaps), and
``splits``, the readers of their output that training and evaluation share."""


class DataError(RuntimeError):
    """A data stage cannot proceed: missing or unreadable input, or an unreachable source.

    The message says what is wrong and how to fix it; stage entry points print it without a
    traceback.
    """


def documents_file(split: str) -> str:
    """The tokenize stage's file of a split's document starts: token offsets, int64, ascending."""
    return f"{split}.docs.npy"
