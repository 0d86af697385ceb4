"""Built-in handlers: one module each."""
