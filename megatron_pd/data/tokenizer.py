"""Tokenizers: SentencePiece models and Hugging Face tokenizers, one interface for the data path.

``load_tokenizer(path)`` takes a SentencePiece ``.model``, an HF ``tokenizer.json``, or an HF
model/tokenizer directory (``tokenizer.json`` plus, optionally, ``tokenizer_config.json``,
``generation_config.json``, ``config.json``), read with the ``tokenizers`` library (no
``transformers`` at training time). Both kinds expose what megatron-core's GPTDataset reads
(``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``) and:

* ``encode_document(text)``: the tokens a document becomes in the data - the tokenizer's own
  special-token template around the text (BOS where the tokenizer adds one: Llama-3 does,
  Qwen and GPT-2 style tokenizers do not), then the end-of-document id (EOD) unless the
  template already ends with it. EOD is the tokenizer's EOS: ``eos_token`` of
  tokenizer_config.json, else ``eos_token_id`` of generation_config.json / config.json (the
  first of a list). The template is tokenizer.json's post-processor: transformers 5's fast
  tokenizers follow it too and ignore ``add_bos_token`` in tokenizer_config.json (tested).
* ``fingerprint``: a hash of what decides the ids - the token-to-id map, the special tokens,
  the model (merges / scores), normaliser and pre-tokeniser, and the document template - so
  the same tokenizer saved as two files matches and two different ones never do.
* ``describe()``: what ``<prefix>.meta.json`` records of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# A fixed probe of whitespace, digits and non-ASCII text: SentencePiece's normaliser is not
# exposed as data, so its effect on these strings enters the fingerprint instead.
_PROBE = "  def f(x):\n\treturn x**2  # caf\u00e9 \u00fcber 12345 \u4e2d\u6587 \U0001f600\r\n"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class SentencePieceTokenizer:
    """A SentencePiece model; EOD is its ``</s>`` (eos) id; documents get no BOS."""

    kind = "sentencepiece"

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise ValueError(f"tokenizer model {model_path} does not exist")
        self.path = self.model_path = os.path.abspath(model_path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"tokenizer model {model_path} cannot be loaded: {err}") from None
        sp = self._sp
        pieces = [
            (sp.IdToPiece(i), round(float(sp.GetScore(i)), 6), _sp_type(sp, i))
            for i in range(sp.GetPieceSize())
        ]
        specials = [sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()]
        self._fingerprint = _digest(
            {"pieces": pieces, "specials": specials, "probe": sp.EncodeAsIds(_PROBE)}
        )

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int | None:
        return None  # documents are not prefixed

    @property
    def pad(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eod

    @property
    def fingerprint(self) -> str:
        """Hash of pieces, scores, types and special ids (and the normaliser's effect)."""
        return self._fingerprint

    @property
    def unique_identifiers(self) -> dict:
        """What megatron's dataset cache hashes to tell tokenizers apart."""
        return {"class": "SentencePiece", "fingerprint": self._fingerprint}

    def tokenize(self, text: str) -> list:
        return self._sp.EncodeAsIds(text)

    def encode_document(self, text: str) -> list:
        return self._sp.EncodeAsIds(text) + [self.eod]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "bos": None,
            "template": {"prefix": [], "suffix": [self.eod]},
        }


def _sp_type(sp, i: int) -> str:
    for name in ("IsControl", "IsUnknown", "IsByte", "IsUnused"):
        if getattr(sp, name)(i):
            return name[2:].lower()
    return "normal"


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            value = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return value if isinstance(value, dict) else {}


def _token_text(value) -> str | None:
    """A tokenizer_config token entry: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face tokenizer (``tokenizer.json``) read with the ``tokenizers`` library."""

    kind = "huggingface"

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise RuntimeError(
                "HF tokenizers need the tokenizers package (pip install tokenizers)"
            ) from None
        path = os.path.abspath(path)
        if os.path.isdir(path):
            directory, file = path, os.path.join(path, "tokenizer.json")
            if not os.path.isfile(file):
                found = sorted(os.listdir(path))[:8]
                raise ValueError(
                    f"tokenizer directory {path} has no tokenizer.json (found {found}); "
                    "megatron_pd reads HF fast tokenizers, or a SentencePiece .model file"
                )
        elif os.path.isfile(path):
            directory, file = os.path.dirname(path), path
        else:
            raise ValueError(f"tokenizer {path} does not exist")
        self.path, self.file, self.directory = path, file, directory
        try:
            self._tok = RustTokenizer.from_file(file)
        except Exception as err:  # the library raises a bare Exception for bad files
            raise ValueError(f"tokenizer file {file} cannot be loaded: {err}") from None
        same_dir = os.path.dirname(file) == directory
        config = _read_json(os.path.join(directory, "tokenizer_config.json")) if same_dir else {}
        generation = _read_json(os.path.join(directory, "generation_config.json"))
        model_config = _read_json(os.path.join(directory, "config.json"))
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        self._eod = self._resolve_eod(config, generation, model_config)
        # BOS as transformers' tokenizer names it (tokenizer_config.json / special_tokens_map)
        special = _read_json(os.path.join(directory, "special_tokens_map.json")) if same_dir else {}
        bos_text = _token_text(config.get("bos_token")) or _token_text(special.get("bos_token"))
        self._bos = self._vocab.get(bos_text) if bos_text is not None else None
        pad = self._token_id(_token_text(config.get("pad_token")), generation.get("pad_token_id"))
        self._pad = pad  # None: the tokenizer has none
        self._prefix, self._suffix = self._template()
        self._fingerprint = self._compute_fingerprint()

    # ------------------------------------------------------------------ special tokens
    def _token_id(self, text: str | None, fallback) -> int | None:
        if text is not None and text in self._vocab:
            return self._vocab[text]
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return int(fallback) if isinstance(fallback, int) else None

    def _resolve_eod(self, config: dict, generation: dict, model_config: dict) -> int:
        eos_text = _token_text(config.get("eos_token"))
        if eos_text is not None:
            if eos_text not in self._vocab:
                raise ValueError(
                    f"tokenizer_config.json of {self.directory}: eos_token {eos_text!r} is not "
                    "in the tokenizer's vocabulary"
                )
            return self._vocab[eos_text]
        for source in (generation, model_config):  # generation_config.json, config.json
            eos = source.get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) and eos else eos
            if isinstance(eos, int):
                return eos
        for text in ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"):
            if text in self._vocab:
                return self._vocab[text]
        raise ValueError(
            f"tokenizer {self.path}: no end-of-document token (no eos_token in "
            "tokenizer_config.json, no eos_token_id in generation_config.json or config.json, "
            "and none of <|endoftext|>, <|end_of_text|>, </s>, <eos> in the vocabulary)"
        )

    def _template(self) -> tuple:
        """(prefix ids, suffix ids) the post-processor puts around a text."""
        ids = self._tok.encode("x", add_special_tokens=True).ids
        bare = self._tok.encode("x", add_special_tokens=False).ids
        start = next(i for i in range(len(ids) - len(bare) + 1) if ids[i : i + len(bare)] == bare)
        return ids[:start], ids[start + len(bare) :]

    def _compute_fingerprint(self) -> str:
        spec = json.loads(self._tok.to_str())
        return _digest(
            {
                "vocab": sorted(self._vocab.items()),
                "added": sorted(
                    (t["id"], t["content"], bool(t.get("special")))
                    for t in spec.get("added_tokens", [])
                ),
                "model": spec.get("model"),
                "normalizer": spec.get("normalizer"),
                "pre_tokenizer": spec.get("pre_tokenizer"),
                "template": [self._prefix, self._suffix, self._eod],
            }
        )

    # ------------------------------------------------------------------ interface
    @property
    def vocab_size(self) -> int:
        """The true vocabulary: one past the largest id (added tokens included)."""
        return max(self._vocab.values()) + 1

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def pad(self) -> int:
        """The padding id megatron's datasets see: the tokenizer's own when it is a distinct
        token, else -1 (megatron's "no padding token"; samples here are never padded)."""
        return self._pad if self._pad is not None and self._pad != self._eod else -1

    @property
    def pad_token_id(self) -> int | None:
        """The tokenizer's own padding id (None when it has none), as transformers names it."""
        return self._pad

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "HFTokenizer", "fingerprint": self._fingerprint}

    def tokenize(self, text: str) -> list:
        """The text's ids without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Ids as transformers' tokenizer(text)["input_ids"] gives them."""
        ids = self.tokenize(text)
        return self._prefix + ids + self._suffix if add_special_tokens else ids

    def encode_document(self, text: str) -> list:
        ids = self._prefix + self.tokenize(text) + self._suffix
        if not ids or ids[-1] != self._eod:
            ids.append(self._eod)
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or f"<{int(token_id)}>"

    def files(self) -> list:
        """The tokenizer files of its directory (what an exported model directory gets)."""
        return [
            os.path.join(self.directory, name)
            for name in HF_FILES + ("generation_config.json",)
            if os.path.isfile(os.path.join(self.directory, name))
        ]

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "bos": self.bos,
            "template": {"prefix": self._prefix, "suffix": self._suffix},
        }


def load_tokenizer(path: str):
    """A SentencePiece ``.model`` file, an HF ``tokenizer.json`` or an HF directory."""
    if not path:
        raise ValueError("no tokenizer given (data.tokenizer_model is not set)")
    if os.path.isdir(path) or path.endswith(".json"):
        return HFTokenizer(path)
    if not os.path.exists(path):
        raise ValueError(f"tokenizer {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(1)
    if head in (b"{", b"["):  # a tokenizer.json under another name
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


Tokenizer = load_tokenizer  # the name callers used when only SentencePiece existed


def resolve_vocab_size(model_cfg, tokenizer) -> int:
    """True vocabulary size of a run; ValueError if the model cannot hold the tokenizer's."""
    if model_cfg.vocab_size is None:
        return tokenizer.vocab_size
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens (data.tokenizer_model={tokenizer.path})"
        )
    return model_cfg.vocab_size


def _sentences(paths: Iterable[str], json_key: str, max_line_chars: int) -> Iterator[str]:
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


def _check_inputs(input_paths: list, vocab_size: int) -> None:
    if vocab_size < 16:
        raise ValueError(f"vocab_size={vocab_size}: too small for a tokenizer")
    missing = [p for p in input_paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"tokenizer input files do not exist: {missing[:3]}")


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
    Code-friendly defaults: no whitespace normalisation, byte fallback (any input encodes),
    and newline/tab as single pieces.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}: must be bpe or unigram")
    _check_inputs(input_paths, vocab_size)
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


EOD_TOKEN = "<|endoftext|>"


def train_hf_bpe(
    input_paths: list, output_dir: str, vocab_size: int, json_key: str = "text"
) -> str:
    """Train a byte-level BPE ``tokenizer.json`` (GPT-2 / Llama-3 / Qwen style) on documents.

    Writes ``output_dir`` as an HF tokenizer directory - ``tokenizer.json`` and
    ``tokenizer_config.json`` (EOD ``<|endoftext|>``, no BOS) - atomically (a temporary
    directory renamed), and returns it. Loadable by ``load_tokenizer`` and by transformers'
    ``AutoTokenizer``.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    _check_inputs(input_paths, vocab_size)
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_documents(input_paths, json_key), trainer=trainer)
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tok.")
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": EOD_TOKEN,
                "pad_token": EOD_TOKEN,
                "model_max_length": 1_000_000_000,
                "clean_up_tokenization_spaces": False,
            },
            f,
            indent=1,
        )
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    return output_dir


def _documents(paths: Iterable[str], json_key: str) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.endswith((".jsonl", ".json")):
                for line in f:
                    if line.strip():
                        yield str(json.loads(line).get(json_key, ""))
            else:
                yield f.read()
