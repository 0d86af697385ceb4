"""Small standalone tools (`python -m nexus.tools.<name>`), e.g. the console Toasty server."""
