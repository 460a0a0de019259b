"""The ``cfsp`` command line: thin wrappers that parse, call the API and print tables, one module
per command (``prune``, ``export`` with ``convert``, ``evaluate``, ``bench``, ``recover``)."""

# isort: skip_file
# Each module registers its command; the import order is the order of ``cfsp --help``.
from cfsp.cli import prune, evaluate, bench, recover, export  # noqa: F401
from cfsp.cli.app import app

__all__ = ["app"]
