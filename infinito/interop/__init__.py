"""INFINITO outside this repository: transformers / Hub folders, lm-evaluation-harness, model cards.

- ``hf``: the GPT-2 weight mapping both ways, the export folders and the Hub upload;
- ``model_card``: the README.md written into an export folder;
- ``lm_eval``: INFINITO as an lm-evaluation-harness model (``--model infinito``).

May import the model and the data readers, never a stage or a pipeline (docs/export.md).
"""


class InteropError(ValueError):
    """A model or folder cannot be converted as asked; the message says why and what to do."""
