"""A handler module that raises at import: a config error, not a crash loop."""

SETTING = {"retries": 3}


def _configure():
    raise RuntimeError(f"missing API key (settings {SETTING})")


_configure()


def handle(event, ctx):  # pragma: no cover
    pass
