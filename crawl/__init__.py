"""The crawl stage: `python -m crawl LIST OUT_DIR` downloads a URL list into a DATA_DIR (see crawl.manifest)."""
