"""`python -m pidserve.cli ...`: the same app as the `pidserve` console script."""

from pidserve.cli import app

app(prog_name="pidserve")
