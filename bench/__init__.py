"""tokentop benchmarks: a realistic dataset generator and a script that prints ingest and query
figures. Nothing here is imported by the product."""
