"""``python -m choreograph`` runs the CLI."""

from choreograph.cli import main

main()
