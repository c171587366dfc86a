"""``python -m musetalk``: the same as the ``musetalk`` command."""

from musetalk.cli import console_main

console_main()
