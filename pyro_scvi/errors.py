"""Exceptions of pyro_scvi, in a module that imports nothing heavy.

The command line imports this at start-up, before it knows whether it needs torch.
"""


class InputError(ValueError):
    """Raised when user input (AnnData, arguments) cannot be used; the message says the fix."""
