"""catalog-tagger: tag large image catalogs with one multi-head model (see architecture.md for the stages)."""
