"""`python -m mmexport` (and `torchrun -m mmexport`): the command line."""

from .cli.main import main

main()
