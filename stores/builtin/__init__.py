"""The embedded default (teacher, tokenizer, probe and evaluation sets), shipped as package data of
`tinyonn.builtin` so that an installed wheel finds it (see `tinyonn.assets`)."""
