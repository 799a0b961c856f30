"""Vocab-parallel top-p-k truncation equals a full sort on one device."""

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from megatron_pd.logits.truncation import (
    TruncationSpec,
    truncate_dense,
    truncate_vocab_parallel,
    truncation_stats,
)
from megatron_pd.parallel.vocab import VocabInfo

TRUE_VOCAB, PADDED, TOKENS = 211, 224, 17
SPECS = ["top-0.95-100", "top-0.95-inf", "top-1.0-50", "top-0.5-20", "top-0.95-1",
         "top-0.9-300"]


def spec_of(name):
    top_k = TruncationSpec.parse(name).top_k
    return TruncationSpec.parse(name, min_k=min(2, top_k or 2), k_cap=256)


def teacher_logits():
    g = torch.Generator().manual_seed(5)
    # Scales from peaked to flat distributions, so p cuts at very different depths.
    scale = torch.linspace(0.3, 6.0, TOKENS)[:, None]
    logits = torch.randn(TOKENS, PADDED, generator=g) * scale
    logits[:, TRUE_VOCAB:] = 1e4  # padding: never a candidate
    return logits


def parallel(rank, world_size, names):
    logits = teacher_logits()
    width = PADDED // world_size
    vocab = VocabInfo(TRUE_VOCAB, PADDED, world_size, rank)
    shard = logits[:, rank * width:(rank + 1) * width]
    return [truncate_vocab_parallel(shard, vocab, spec_of(n), dist.group.WORLD, chunk_tokens=5)
            for n in names]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_vocab_parallel_equals_full_sort(world_size):
    results = run_distributed(parallel, world_size, SPECS)
    for index, name in enumerate(SPECS):
        expected = truncate_dense(teacher_logits(), TRUE_VOCAB, spec_of(name))
        for rank in range(world_size):
            actual = results[rank][index]
            assert torch.equal(actual.indices, expected.indices), (name, rank)
            torch.testing.assert_close(actual.logprobs, expected.logprobs, rtol=0, atol=1e-5)


def test_rule_semantics():
    logits = teacher_logits()
    probs = torch.softmax(logits[:, :TRUE_VOCAB].double(), -1)
    for name in ("top-0.95-100", "top-0.5-20", "top-0.9-300"):
        spec = TruncationSpec.parse(name, min_k=1, k_cap=256)
        kept = truncate_dense(logits, TRUE_VOCAB, spec)
        counts = kept.kept_counts()
        for n in range(TOKENS):
            p_sorted = probs[n].sort(descending=True).values
            needed = int((torch.cumsum(p_sorted, 0) < spec.top_p).sum()) + 1
            assert counts[n] == min(needed, spec.slots), (name, n)
    top_k = truncate_dense(logits, TRUE_VOCAB, TruncationSpec.parse("top-1.0-50"))
    assert (top_k.kept_counts() == 50).all()
    assert torch.equal(top_k.indices[:, :50],
                       logits[:, :TRUE_VOCAB].topk(50, -1).indices)
    floor = truncate_dense(logits, TRUE_VOCAB, TruncationSpec.parse("top-0.01-10", min_k=3))
    assert (floor.kept_counts() == 3).all()
    stats = truncation_stats(truncate_dense(logits, TRUE_VOCAB,
                                            TruncationSpec.parse("top-0.95-100")))
    assert 1 <= stats["kept_per_token"] <= 100 and 0.5 < stats["kept_mass"] <= 1.0


def test_names():
    assert TruncationSpec.parse("top-0.95-inf").top_k is None
    assert TruncationSpec.parse("top-0.95-inf").name == "top-0.95-inf"
    assert TruncationSpec(0.95, 50).name == "top-0.95-50"
    with pytest.raises(ValueError, match="expected top-P-K"):
        TruncationSpec.parse("top-k-5")
    with pytest.raises(ValueError, match="min_k=5 exceeds top_k=2"):
        TruncationSpec(0.9, 2, min_k=5)


@pytest.mark.parametrize(
    "stored,wanted",
    [
        ("top-0.95-100", "top-0.95-50"),
        ("top-0.95-100", "top-0.8-20"),
        ("top-0.95-100", "top-0.95-1"),
        ("top-0.95-inf", "top-0.5-inf"),
        ("top-1.0-50", "top-1.0-10"),
    ],
)
def test_narrower_truncation_of_stored_entries_equals_direct(stored, wanted):
    """A store dumped at one top-p-k serves any narrower one exactly (what a student with its
    own distill.truncation reads)."""
    from megatron_pd.logits.truncation import derivable_from, retruncate

    logits = teacher_logits()
    have = TruncationSpec.parse(stored, k_cap=256)
    want = TruncationSpec.parse(wanted, k_cap=256)
    assert derivable_from(want, have) is None
    kept = truncate_dense(logits, TRUE_VOCAB, have)
    shuffled = torch.randperm(kept.indices.shape[1], generator=torch.Generator().manual_seed(0))
    kept = type(kept)(kept.indices[:, shuffled], kept.logprobs[:, shuffled])  # any slot order
    got = retruncate(kept, want)
    expected = truncate_dense(logits, TRUE_VOCAB, want)
    assert torch.equal(got.indices, expected.indices)
    torch.testing.assert_close(got.logprobs, expected.logprobs, rtol=0, atol=1e-6)


def test_wider_truncation_than_stored_is_refused():
    from megatron_pd.logits.truncation import derivable_from

    have = TruncationSpec.parse("top-0.95-100")
    assert "p=1 exceeds the stored p=0.95" in derivable_from(TruncationSpec.parse("top-1.0-50"),
                                                           have)
    assert "k=200 exceeds the stored k=100" in derivable_from(
        TruncationSpec.parse("top-0.9-200"), have)
    assert "k=inf exceeds" in derivable_from(TruncationSpec.parse("top-0.9-inf"), have)
    assert "min_k=3 exceeds" in derivable_from(TruncationSpec.parse("top-0.9-50", min_k=3), have)


HIDDEN = 6


def integer_hidden_and_weight():
    """Small-integer hidden states and output weight: every logit h . w is an exact integer
    in fp32 whatever the GEMM's summation order, and many tie (as bf16 teachers' do)."""
    g = torch.Generator().manual_seed(9)
    hidden = torch.randint(-3, 4, (TOKENS, HIDDEN), generator=g).float()
    weight = torch.randint(-2, 3, (PADDED, HIDDEN), generator=g).float()
    return hidden, weight


def from_hidden(rank, world_size, names, transposed=False):
    from megatron_pd.logits import truncation
    from megatron_pd.logits.truncation import truncate_hidden_vocab_parallel

    if transposed:  # the multi-threaded CPU path (forked workers keep to one thread)
        truncation.transposed_gemms = lambda device: True
    assert truncation.transposed_gemms(torch.device("cpu")) == transposed

    hidden, weight = integer_hidden_and_weight()
    width = PADDED // world_size
    vocab = VocabInfo(TRUE_VOCAB, PADDED, world_size, rank)
    rows = weight[rank * width : (rank + 1) * width]
    return [
        truncate_hidden_vocab_parallel(
            hidden, rows, vocab, spec_of(n), dist.group.WORLD, chunk_tokens=4
        )
        for n in names
    ]


@pytest.mark.parametrize("world_size,transposed", [(1, False), (2, False), (4, False), (2, True)])
def test_truncation_from_hidden_states_keeps_the_same_entries(world_size, transposed):
    """The teacher's fused output layer + top-p-k (logits made 4 tokens at a time, never
    whole; also as W h^T copied transposed) keeps exactly the entries, ties included, and
    log-probs of truncating the full logits on one rank."""
    results = run_distributed(from_hidden, world_size, SPECS, transposed)
    hidden, weight = integer_hidden_and_weight()
    logits = hidden @ weight.t()
    assert (logits[:, :TRUE_VOCAB].unsqueeze(-1) == logits[:, None, :TRUE_VOCAB]).sum() > 2000
    for index, name in enumerate(SPECS):
        expected = truncate_dense(logits, TRUE_VOCAB, spec_of(name))
        for rank in range(world_size):
            actual = results[rank][index]
            assert torch.equal(actual.indices, expected.indices), (name, rank)
            torch.testing.assert_close(actual.logprobs, expected.logprobs, rtol=0, atol=1e-6)
            torch.testing.assert_close(actual.log_tail, expected.log_tail, rtol=0, atol=1e-6)
