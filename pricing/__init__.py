"""tokentop: pricing."""
