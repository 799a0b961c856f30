"""SentencePiece tokenizers: training one from text/jsonl, and the wrapper the data path uses.

The wrapper exposes what megatron-core's GPTDataset reads (``vocab_size``, ``eod``, ``pad``)
plus ``fingerprint`` (a hash of the model file) that checkpoints and logit stores record so a
student can never silently pair with data or a teacher from another tokenizer.

Code-friendly defaults: no whitespace normalisation, byte fallback (any input encodes), and
newline/tab as single pieces.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class Tokenizer:
    """A SentencePiece model; end of document (EOD) is its ``</s>`` (eos) id."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise ValueError(f"tokenizer model {model_path} does not exist")
        self.model_path = os.path.abspath(model_path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"tokenizer model {model_path} cannot be loaded: {err}") from None
        with open(self.model_path, "rb") as f:
            self._fingerprint = hashlib.sha256(f.read()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eod

    @property
    def fingerprint(self) -> str:
        """sha256 prefix of the model file: equal fingerprints mean identical tokenizers."""
        return self._fingerprint

    @property
    def unique_identifiers(self) -> dict:
        """What megatron's dataset cache hashes to tell tokenizers apart."""
        return {"class": "SentencePiece", "fingerprint": self._fingerprint}

    def tokenize(self, text: str) -> list:
        return self._sp.EncodeAsIds(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))


def _sentences(paths: Iterable[str], json_key: str, max_line_chars: int) -> Iterator[str]:
    import json

    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.endswith((".jsonl", ".json")):
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[json_key]
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(
                            f"{path}:{number}: not a JSON object with a {json_key!r} string"
                        ) from None
                    for sentence in str(text).splitlines():
                        if sentence.strip():
                            yield sentence[:max_line_chars]
            else:
                for line in f:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line[:max_line_chars]


def train_sentencepiece(
    input_paths: list,
    output_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    json_key: str = "text",
    max_sentences: int = 2_000_000,
    seed_sentencepiece_size: int = 200_000,
    num_threads: int = 2,
) -> str:
    """Train a SentencePiece model on text files (a line is a sentence) or jsonl documents.

    Writes ``<output_prefix>.model`` and ``.vocab`` atomically and returns the model path.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}: must be bpe or unigram")
    if vocab_size < 16:
        raise ValueError(f"vocab_size={vocab_size}: too small for a tokenizer")
    missing = [p for p in input_paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"tokenizer input files do not exist: {missing[:3]}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    options = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n", "\t"],
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=num_threads,
        max_sentence_length=16384,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".spm.") as tmp:
        tmp_prefix = os.path.join(tmp, "model")
        try:
            spm.SentencePieceTrainer.Train(
                sentence_iterator=_sentences(input_paths, json_key, max_line_chars=4096),
                model_prefix=tmp_prefix,
                **options,
            )
        except RuntimeError as err:
            raise ValueError(f"sentencepiece training failed: {err}") from None
        for suffix in (".vocab", ".model"):  # the .model last: it is what readers look for
            shutil.move(tmp_prefix + suffix, output_prefix + suffix + ".tmp")
            os.replace(output_prefix + suffix + ".tmp", output_prefix + suffix)
    return output_prefix + ".model"
