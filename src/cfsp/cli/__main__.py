"""``python -m cfsp.cli`` (the same as ``python -m cfsp``)."""

from cfsp.cli import app

app(prog_name="cfsp")
