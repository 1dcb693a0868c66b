"""Training the shipped default model (``twotower_rt/default_model``): data, tokenizer, the two
training stages and the export. Not imported by the runtime; ``python -m twotower_rt.train``."""
