"""``python -m cfsp``, and so ``torchrun -m cfsp recover ...`` and ``accelerate launch -m cfsp ...``."""

from cfsp.cli import app

app(prog_name="cfsp")
