"""The installed distribution's version: what an index's manifest and the service report (read here, not from the
package root, so that a layer below the top need not import the root, which re-exports every layer)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:  # one place holds the version: pyproject.toml, read back from the installed metadata
    __version__ = version("grape-rewards")
except PackageNotFoundError:  # pragma: no cover - imported from a source tree that was never installed
    __version__ = "0+unknown"
