"""``python -m cfsp.cli``."""

from cfsp.cli import app

app()
