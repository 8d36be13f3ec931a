"""Tools that make training data, used by the `data_recipes/` entry points: converters of public corpora
(`corpora`) and the self-instruct generator (`self_instruct`). Training never imports them."""
