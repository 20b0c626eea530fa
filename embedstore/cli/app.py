"""The typer application that every command module registers itself on."""

import typer

app = typer.Typer(
    name="embedstore",
    help=(
        "Extract frozen image embeddings once into a zarr feature store, then probe, "
        "match and report on them without reading an image again."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
