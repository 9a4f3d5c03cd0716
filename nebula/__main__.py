"""``python -m nebula ...`` works where the ``nebula`` script is not on PATH."""

from nebula.cli import main

main()
