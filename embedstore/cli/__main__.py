"""`python -m embedstore.cli` runs the command line."""

from embedstore.cli import main

main()
