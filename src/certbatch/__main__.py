"""`python -m certbatch`."""

from .cli import main

main()
