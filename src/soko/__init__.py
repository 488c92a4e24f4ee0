"""Soko: a backend platform for marketplaces of goods and services."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("soko")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
