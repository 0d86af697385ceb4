"""The launcher (`python -m nexus.launch`): starts the router, sources and members
as children, restarts them with backoff, stops crash loops, answers control requests."""
