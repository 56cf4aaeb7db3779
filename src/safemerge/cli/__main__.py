"""``python -m safemerge.cli`` — same as the ``safemerge`` console script."""
from safemerge.cli import main

main()
