"""The tagging job: list -> plan -> read/decode -> predict -> sink -> commit, one module per stage."""
