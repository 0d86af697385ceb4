"""Process-level utilities every role uses: logging, atomic state files, signals
and parent death, the crash black box, the data-dir lock, user-module import."""
