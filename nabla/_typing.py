"""``TYPE_CHECKING`` for the modules the command line reads to build its parsers.

jsonargparse executes a module's ``if typing.TYPE_CHECKING:`` blocks when it resolves that module's annotations,
which would import torch and transformers for ``nabla <command> --help``. A ``TYPE_CHECKING`` that is not
``typing``'s is left alone by jsonargparse, while type checkers treat any name ``TYPE_CHECKING`` as true.
"""

TYPE_CHECKING = False
