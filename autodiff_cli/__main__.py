"""`python -m autodiff_cli ...` is the `autodiff` command."""
from autodiff_cli.app.cli import main

main()
