"""Entry points that make training data: `python -m data_recipes.NAME --help` (converters of public corpora, the
phantom demo set, self-instruct generation, the pass-rate filter)."""
