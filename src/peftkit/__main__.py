"""``python -m peftkit`` runs the ``peftkit`` command."""

from .cli import main

main()
