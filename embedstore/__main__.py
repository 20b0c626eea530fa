"""`python -m embedstore` runs the command line."""

from embedstore.cli import main

main()
