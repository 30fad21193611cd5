"""tokentop: store."""
