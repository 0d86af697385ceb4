"""A handler module that kills its process on import: a crash loop for the launcher."""

import os

os._exit(17)


def handle(event, ctx):  # pragma: no cover
    pass
