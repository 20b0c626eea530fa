"""The checks an extraction runs on its options and its source before any work, each ending in one line.

:func:`check_options` runs before the model is loaded or anything is read (the CLI calls it first, too);
:func:`check_shard_gets_chunks` once the source's table and the store are known, before hashing;
:func:`check_some_readable` once the images are hashed, before the store is written. The messages name
the library's parameters (``shard``, ``rows_per_chunk``, ...), which the CLI's flags mirror.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from embedstore.decoding import failure_reason
from embedstore.devices import parse_device, resolve_device
from embedstore.errors import ConfigError, SourceError
from embedstore.store import DTYPES

if TYPE_CHECKING:  # annotations only
    from embedstore.sources import Source
    from embedstore.store import FeatureStore


def default_batch_size(device: torch.device) -> int:
    """64 on a GPU; 8 on a CPU, where small batches stay in cache (MobileNetV2 on 2 cores: 104 images/s at 8,
    44 at 64)."""
    return 64 if device.type == "cuda" else 8


def default_workers(device: torch.device) -> int:
    """Decoding workers: half the cores on CPU (the model needs the rest), up to 8 beside a GPU."""
    cores = os.cpu_count() or 1
    return min(8, cores) if device.type == "cuda" else max(1, min(4, cores // 2))


def parse_shard(shard: str | tuple[int, int]) -> tuple[int, int]:
    """``"I/N"`` or ``(I, N)`` -> ``(I, N)``, refusing anything else or an I outside 0..N-1."""
    if isinstance(shard, tuple):
        index, count = shard
    else:
        try:
            index, count = (int(v) for v in shard.split("/"))
        except ValueError:
            raise ConfigError(f"shard must be I/N (e.g. 0/4), not {shard!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count}: I must be in 0..N-1")
    return index, count


def check_options(*, device: str = "auto", batch_size: int | None = None, num_workers: int | None = None,
                  dtype: str = "float16", rows_per_chunk: int = 1024,
                  shard: str | tuple[int, int] = (0, 1), ray: str | None = None,
                  ray_workers: int | None = None) -> tuple[torch.device | None, int | None, tuple[int, int]]:
    """Refuse a bad extraction option in one line before any work (no model loaded, nothing hashed or
    written); returns the device, the batch size and the shard (index, count).

    With ``ray`` the workers' device is the cluster's to say (:func:`embedstore.ray_extraction.ray_session`):
    the device is checked for its spelling only, and it and a default batch size come back as None.
    """
    if ray is not None:
        check_ray(ray, ray_workers, shard, device)
        dev = None
    elif ray_workers is not None:
        raise ConfigError("ray_workers needs ray (the Ray cluster to run them on)")
    else:
        dev = resolve_device(device)
        batch_size = default_batch_size(dev) if batch_size is None else batch_size
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    if rows_per_chunk < 1:
        raise ConfigError(f"rows_per_chunk must be at least 1, not {rows_per_chunk}")
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"num_workers must be 0 (decode in the main process) or more, not {num_workers}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return dev, batch_size, parse_shard(shard)


def check_ray(address: str, workers: int | None, shard: str | tuple[int, int], device: str) -> None:
    """Refuse a bad Ray address, worker count or device name, a shard beside Ray (which drives every chunk),
    and a missing Ray."""
    from embedstore.ray_extraction import check_address, import_ray

    check_address(address)
    if device.startswith("cuda:"):
        raise ConfigError(f"device {device!r}: Ray gives each worker a GPU of its own; use cuda or auto")
    if device != "auto":
        parse_device(device)
    if workers is not None and workers < 1:
        raise ConfigError(f"ray_workers must be at least 1, not {workers}")
    if parse_shard(shard) != (0, 1):
        raise ConfigError("ray drives every row chunk itself; drop shard")
    import_ray()


def check_shard_gets_chunks(existing: FeatureStore | None, table, key: str, rows_per_chunk: int, index: int,
                            count: int) -> None:
    """Refuse, before any work, a shard that none of this source's row chunks falls to (it would do nothing)."""
    if count == 1:
        return
    rows = existing.planned_rows(table["id"]) if existing else np.arange(len(table))
    fixed = existing.chunking(key) if existing else None
    rpc = fixed or rows_per_chunk
    chunks = np.unique(rows // rpc)
    if (chunks % count == index).any():
        return
    instead = ("fewer shards (the feature set's chunking is fixed)" if fixed else
               f"fewer shards, or rows_per_chunk {max(1, len(rows) // count)}")
    raise ConfigError(f"shard {index}/{count}: the {len(rows):,} images of this source fill {len(chunks)} row "
                      f"chunk(s) of {rpc:,} rows, so shard {index} would get none; use {instead}")


def check_some_readable(source: Source, table, hashes: Sequence[str]) -> None:
    """Refuse a source none of whose images can be read (a wrong image folder or path template), before any
    model work and before the store is written."""
    if any(hashes):
        return
    first = table["_path"].iloc[0]
    try:
        source.read_bytes(first)
        reason = "unreadable"
    except Exception as exc:  # noqa: BLE001 - any reason is reported, none is fatal here
        reason = failure_reason(exc)
    raise SourceError(f"none of the {len(table):,} images of the source can be read (first: {source.where(first)}: "
                      f"{reason}); check the source's image folder and path template (or its path column and metadata)")
