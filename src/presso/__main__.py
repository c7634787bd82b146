"""``python -m presso`` (also ``torchrun --nproc-per-node N -m presso train ...``)."""

from presso.cli import main

main()
