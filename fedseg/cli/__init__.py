"""The `fedseg` command line: thin typer commands over the library."""
