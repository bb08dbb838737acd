"""The registry client: the only part of lazysnap that talks HTTP."""
