"""The options several commands share, declared once so a flag means the same in every command.

Convention: the store is the first argument of every command that reads one (``extract`` writes
one and takes it as ``--store/-s``); short flags mean the same everywhere (``-c`` config, ``-f``
features, ``-g`` groups, ``-o`` out, ``-q`` quiet); options that a recipe can set default to
``None`` here and their defaults are shown in the help as "(default X)", the config's value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from embedstore.errors import ConfigError

StoreArg = Annotated[Optional[Path], typer.Argument(help="Feature store to read (or `store:` in --config).",
                                                    show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe (configs/*.yaml); options "
                                                   "given here override it.")]
GroupsOpt = Annotated[Optional[str], typer.Option("--groups", "-g", help="Group column: no group is on both sides "
                                                  "of a split (e.g. lesion_id); default none (each image its own).")]
FoldsOpt = Annotated[Optional[int], typer.Option("--folds", help="Group folds of the cross-validation (default 5).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed of folds, heads, tuning and bootstrap (default 0).")]
NBootOpt = Annotated[Optional[int], typer.Option("--n-boot", help="Bootstrap resamples (by group) per 95% CI "
                                                 "(default 1000).")]
ReportOpt = Annotated[Optional[bool], typer.Option("--report/--no-report", help="Write report.html and report.md "
                                                   "into the run folder (default: write them).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the folder at --out if embedstore wrote "
                                            "it (never anything else).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress (no bar on a terminal, no progress lines in a log).")]
MergeOpt = Annotated[Optional[Path], typer.Option("--merge-near-duplicates", help="An audit folder (embedstore "
                                                  "audit), or a cosine similarity (e.g. 0.98) applied to the first "
                                                  "feature set: join the groups of every flagged pair before splitting.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if present), cpu, or cuda[:N].")]


def out_option(default: str) -> object:
    """``--out/-o``: where the command writes, with the command's default shown the same way everywhere."""
    return Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Where to write (default {default}).")]


def run_overrides(**options) -> dict:
    """Command-line values for ``RunConfig.from_yaml``: paths as strings; ``None`` (not given) is left to the
    recipe or the config's default."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}


def parse_split_map(items: list[str]) -> dict:
    """``["excluded=drop", "valid=train"]`` (or one comma-separated item) -> ``{"excluded": "drop", "valid": "train"}``."""
    mapping = {}
    for item in (part for entry in items for part in entry.split(",") if part.strip()):
        value, sep, action = item.partition("=")
        if not sep:
            raise ConfigError(f"--split-map takes VALUE=ACTION (e.g. excluded=drop), got {item!r}")
        mapping[value.strip()] = action.strip()
    return mapping
