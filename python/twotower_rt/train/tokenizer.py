"""A byte-level BPE tokenizer trained on the training split with the ``tokenizers`` library.
Special tokens take the first ids, as the runtime expects: <pad> 0, <s> 1, </s> 2, <mask> 3."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")
PAD_ID, BOS_ID, EOS_ID, MASK_ID = range(4)


def train_tokenizer(documents: list[str], vocab_size: int = 2048) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(documents, trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    return tok


def encode_documents(tok: Tokenizer, documents: list[str]) -> list[int]:
    """All documents as one token stream, EOS after each."""
    ids: list[int] = []
    for enc in tok.encode_batch(documents):
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return ids
