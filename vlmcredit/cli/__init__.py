"""Command-line interface: a typer app, one module per command; thin wrappers over the library."""
