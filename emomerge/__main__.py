"""``python -m emomerge`` (and ``accelerate launch -m emomerge ...``) runs the CLI."""

from emomerge.cli import main

main()
