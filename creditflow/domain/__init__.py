"""Pure domain rules: no I/O and no clock (``now`` is passed in)."""
