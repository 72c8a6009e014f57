"""CLI commands that live in their own modules; each registers itself on ``cli.app``.

A module here does ``from cnalens.cli import app, ModelOpt, ...`` and decorates its
functions with ``@app.command()``; ``cnalens.cli`` imports them all at its end
(:data:`MODULES`). Keep the heavy imports inside the command functions.
"""

MODULES = ("reading", "lora", "prune", "debias")
