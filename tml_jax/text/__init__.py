from tml_jax.text.tokenizer import ByteTokenizer  # noqa: F401
