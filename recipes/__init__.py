"""How the builtin teacher was made: corpus shards, tokenizer, pretraining, export, card.

Not part of the library (a user never needs it); run as `python -m recipes.teacher STEP`.
"""
