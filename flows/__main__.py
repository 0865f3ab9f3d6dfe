"""``python -m flows`` is the ``diffcl`` command."""

from flows.cli import main

main()
