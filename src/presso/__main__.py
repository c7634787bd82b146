"""``python -m presso`` (also ``torchrun --nproc-per-node N -m presso train ...``)."""

import sys

try:  # a Ctrl-C while the CLI is still being imported ends like one in a command: one line, status 130
    from presso.cli import main
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    sys.exit(130)

main()
