"""``python -m presso.cli``, as ``python -m presso``."""

from presso.cli import main

main()
