"""The one syntax of every setting that names index folders: ``--index`` of every command, ``index`` of the serve
config and ``GRAPE_INDEX``, and the adapters' ``index`` setting.

One folder, several separated by commas (``A,B``), a list of them (a repeated flag, a YAML list, a Python list),
or a mix (``--index A,B --index C``): several make an ensemble of their retrievers. Folder names cannot hold a
comma. Imports nothing heavy (the adapters read it in every reward worker).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from os import PathLike


def parse_index_list(value: str | PathLike[str] | Sequence[str | PathLike[str]], where: str = "--index") -> list[str]:
    """The index folders ``value`` names, in order; an empty entry (a stray comma) is refused naming it.

    ``where`` names the setting in the error message (``--index``, ``GRAPE_INDEX``...).

    >>> parse_index_list("idx/a, idx/b"), parse_index_list(["idx/a,idx/b", "idx/c"])
    (['idx/a', 'idx/b'], ['idx/a', 'idx/b', 'idx/c'])
    >>> parse_index_list("idx/a,", "GRAPE_INDEX")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: GRAPE_INDEX 'idx/a,': entry 2 of 2 is empty (a stray comma?); name index folders separated by ...
    """
    if isinstance(value, (str, PathLike)):
        parts: list[object] = [value]
    elif isinstance(value, Iterable):  # a list, a tuple, a Hydra ListConfig
        parts = list(value)
    else:
        raise ValueError(f"{where}: expected index folders, got {type(value).__name__} {value!r}")
    if not parts:
        raise ValueError(f"{where}: no index folder given; name one, or several separated by commas")
    folders: list[str] = []
    for part in parts:
        if not isinstance(part, (str, PathLike)):
            raise ValueError(f"{where}: expected index folders (text), got {type(part).__name__} {part!r}")
        text = str(part)
        entries = [entry.strip() for entry in text.split(",")]
        for position, entry in enumerate(entries, 1):
            if not entry:
                raise ValueError(f"{where} {text!r}: entry {position} of {len(entries)} is empty (a stray comma?); "
                                 "name index folders separated by commas, e.g. indexes/a,indexes/b")
        folders.extend(entries)
    return folders
