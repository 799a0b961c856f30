"""HF tokenizers (tokenizer.json via the tokenizers library) equal transformers' fast tokenizer.

On real stdlib text (special tokens inside the text included), for a GPT-2/Qwen-style
byte-level BPE without BOS and a Llama-3-style one whose template adds BOS, with and without
``add_bos_token`` in tokenizer_config.json (transformers 5 follows the template either way);
the document tokens (template + EOD), where EOD
comes from, and fingerprints (the same tokenizer in two files matches, another never does).
"""

import json
import os
import shutil

import pytest

from megatron_pd.data.corpus import stdlib_corpus_files
from megatron_pd.data.tokenizer import (
    EOD_TOKEN,
    HFTokenizer,
    load_tokenizer,
    train_hf_bpe,
    train_sentencepiece,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_hf_bpe(
        stdlib_corpus_files()[:8], str(tmp_path_factory.mktemp("t") / "bpe"), vocab_size=600
    )


def texts():
    out = []
    for path in stdlib_corpus_files()[20:32]:
        with open(path, encoding="utf-8", errors="replace") as f:
            out.append(f.read()[:4000])
    out.append(f"first document{EOD_TOKEN}second one\n\t  spaces   and caf\u00e9 \u4e2d\u6587")
    out.append("")
    return out


def llama3_style(bpe_dir, target, add_bos=None):
    """The BPE with <|begin_of_text|> added and a template that prefixes it (as Llama-3)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    shutil.copytree(bpe_dir, target)
    tok = Tokenizer.from_file(os.path.join(target, "tokenizer.json"))
    tok.add_special_tokens(["<|begin_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok.save(os.path.join(target, "tokenizer.json"))
    config = json.loads(open(os.path.join(target, "tokenizer_config.json")).read())
    config["bos_token"] = "<|begin_of_text|>"
    if add_bos is not None:
        config["add_bos_token"] = add_bos
    with open(os.path.join(target, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return target, bos


def assert_same_ids(directory):
    ours = load_tokenizer(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    for text in texts():
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, text[:60]
        assert (
            ours.encode(text, add_special_tokens=False)
            == theirs(text, add_special_tokens=False)["input_ids"]
        )
    assert ours.vocab_size == len(theirs)
    assert ours.eod == theirs.eos_token_id
    return ours


def test_byte_level_bpe_equals_transformers(bpe_dir):
    ours = assert_same_ids(bpe_dir)
    assert ours.bos is None
    doc = ours.encode_document("x = 1\n")
    assert doc[-1] == ours.eod and doc[:-1] == ours.encode("x = 1\n")
    assert ours.describe()["template"] == {"prefix": [], "suffix": []}


def test_llama3_style_template_equals_transformers(bpe_dir, tmp_path):
    directory, bos = llama3_style(bpe_dir, str(tmp_path / "llama3"))
    ours = assert_same_ids(directory)
    assert ours.bos == bos
    doc = ours.encode_document("x = 1\n")
    assert doc[0] == bos and doc[-1] == ours.eod


@pytest.mark.parametrize("add_bos", [False, True])
def test_add_bos_token_follows_transformers(bpe_dir, tmp_path, add_bos):
    """transformers' fast tokenizers follow the post-processor whatever add_bos_token says."""
    directory, bos = llama3_style(bpe_dir, str(tmp_path / f"bos_{add_bos}"), add_bos=add_bos)
    ours = assert_same_ids(directory)
    assert ours.encode("abc")[0] == bos


def test_eod_from_generation_config(bpe_dir, tmp_path):
    target = tmp_path / "gen"
    shutil.copytree(bpe_dir, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert load_tokenizer(str(target)).eod == 5
    (target / "generation_config.json").unlink()
    assert load_tokenizer(str(target)).eod == 0  # the named <|endoftext|> token, id 0 here


def test_fingerprint_follows_content_not_files(bpe_dir, tmp_path):
    from tokenizers import Tokenizer

    first = load_tokenizer(os.path.join(bpe_dir, "tokenizer.json"))
    compact = tmp_path / "compact.json"
    Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json")).save(str(compact), pretty=False)
    assert open(compact, "rb").read() != open(os.path.join(bpe_dir, "tokenizer.json"), "rb").read()
    assert HFTokenizer(str(compact)).fingerprint == first.fingerprint
    assert load_tokenizer(bpe_dir).fingerprint == first.fingerprint
    other = train_hf_bpe(stdlib_corpus_files()[40:44], str(tmp_path / "other"), vocab_size=600)
    assert load_tokenizer(other).fingerprint != first.fingerprint
    with_bos, _ = llama3_style(bpe_dir, str(tmp_path / "with_bos"))
    assert load_tokenizer(with_bos).fingerprint != first.fingerprint


def test_sentencepiece_fingerprint_follows_content(tmp_path):
    files = stdlib_corpus_files()[:4]
    model = train_sentencepiece(files, str(tmp_path / "a"), vocab_size=512, num_threads=1)
    copy = tmp_path / "b.model"
    shutil.copy(model, copy)
    assert load_tokenizer(model).fingerprint == load_tokenizer(str(copy)).fingerprint
    other = train_sentencepiece(
        stdlib_corpus_files()[5:9], str(tmp_path / "c"), vocab_size=512, num_threads=1
    )
    assert load_tokenizer(other).fingerprint != load_tokenizer(model).fingerprint


def test_preprocess_records_the_tokenizer(bpe_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_pd.data.preprocess import preprocess

    directory, bos = llama3_style(bpe_dir, str(tmp_path / "llama3"))
    files = stdlib_corpus_files()[50:53]
    preprocess(files, str(tmp_path / "docs"), directory, progress=False)
    meta = json.loads((tmp_path / "docs.meta.json").read_text())
    tok = load_tokenizer(directory)
    assert meta["tokenizer"]["kind"] == "huggingface" and meta["bos"] == bos
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    dataset = IndexedDataset(str(tmp_path / "docs"))
    with open(files[0], encoding="utf-8", errors="replace") as f:
        assert dataset[0].tolist() == tok.encode_document(f.read())


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_tokenizer(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
