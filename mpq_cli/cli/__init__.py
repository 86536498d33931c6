"""The ``mpq`` command line: parse options, call one API function, print the result.

One module per group of commands (training, sweep, files, listing); :mod:`.options` declares the options they
share, :mod:`.output` what they print. Nothing here imports torch until a command runs, so ``mpq --help`` and
``mpq inspect FILE`` do not wait for it.
"""

# isort: off
# each module registers its commands on the app; `mpq --help` lists them in this order
from . import training, sweep, files, listing  # noqa: F401

# isort: on
from .entry import app, main, on_sigterm

__all__ = ["app", "main", "on_sigterm"]
