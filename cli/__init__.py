"""The ``metacompress`` command line: thin Typer commands over the library."""
