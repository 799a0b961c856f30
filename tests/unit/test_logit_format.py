"""The logits store's sample codec and shard files, without a teacher (single process)."""

import numpy as np
import pytest

from megatron_pd.logits import store_format as F
from megatron_pd.logits.store import StoreReader, StoreWriter


def random_entries(rng, seq, slots, vocab, min_kept=0):
    ids = np.full((seq, slots), -1, dtype=np.int64)
    logp = np.zeros((seq, slots), dtype=np.float32)
    for t in range(seq):
        kept = int(rng.integers(min_kept, slots + 1))
        ids[t, :kept] = rng.choice(vocab, kept, replace=False)
        logp[t, :kept] = -rng.exponential(3.0, kept)
    perm = rng.permutation(slots)  # empty slots anywhere, ids in any order
    return ids[:, perm], logp[:, perm]


def header(vocab, seq, slots, **extra):
    """A store header for hand-made samples."""
    return F.StoreHeader(
        vocab_size=vocab,
        tokenizer_fingerprint="t",
        dataset={"seq_length": seq},
        teacher={},
        truncation={"slots": slots},
        **extra,
    )


@pytest.mark.parametrize(
    "vocab,slots", [(512, 12), (4096, 100), (151552, 50), (151552, 300), (2**24 + 5, 8)]
)
def test_codec_round_trip(vocab, slots):
    rng = np.random.default_rng(vocab + slots)
    seq = 33
    ids, logp = random_entries(rng, seq, slots, vocab)
    ids[0, :] = -1  # a token with nothing kept
    ids[1, 0], ids[1, 1] = vocab - 1, 0  # the vocabulary's edges
    codec = F.BlockCodec(seq, slots, F.id_bytes_for(vocab), 8, 16.0)
    got_ids, got_logp, no_tail = codec.decode(codec.encode(ids, logp))
    assert no_tail is None
    assert got_ids.shape == (seq, slots) and got_logp.shape == (seq, slots)
    for t in range(seq):
        valid = ids[t] >= 0
        order = np.argsort(ids[t][valid])
        n = int(valid.sum())
        assert np.array_equal(got_ids[t, :n], ids[t][valid][order])
        assert (got_ids[t, n:] == -1).all() and (got_logp[t, n:] == 0).all()
        expected = np.clip(logp[t][valid][order], -16.0, 0.0)
        assert np.all(np.abs(got_logp[t, :n] - expected) <= 16.0 / 255 / 2 + 1e-6)


def test_id_bytes_have_no_vocabulary_cap():
    assert [F.id_bytes_for(v) for v in (256, 257, 65536, 131072, 151552, 2**24 + 1)] == [
        1,
        2,
        2,
        3,
        3,
        4,
    ]


def test_codec_rejects_damaged_blocks():
    rng = np.random.default_rng(0)
    codec = F.BlockCodec(8, 6, 2, 8, 16.0)
    raw = codec.encode(*random_entries(rng, 8, 6, 1000, min_kept=1))
    with pytest.raises(ValueError, match="bytes, its counts describe"):
        codec.decode(raw[:-3])
    with pytest.raises(ValueError, match="exceeds the 6 slots"):
        codec.decode(bytes([200]) + raw[1:])
    with pytest.raises(ValueError, match=r"shape \(8, 7\)"):
        codec.encode(np.zeros((8, 7), dtype=np.int64), np.zeros((8, 7), dtype=np.float32))


def test_recorded_store_keeps_the_latest_step_of_a_sample(tmp_path):
    """Two epochs of a pre-training run record sample 5 twice: the later step wins, whatever
    order the shard files sort in."""
    writer = StoreWriter(str(tmp_path), header(100, 4, 3, source="pretraining"))
    rng = np.random.default_rng(1)
    late = random_entries(rng, 4, 3, 100, min_kept=1)
    early = random_entries(rng, 4, 3, 100, min_kept=1)
    tail = np.full(4, -3.0)
    writer.write_shard("a_late", [5, 6], [9, 9], [writer.encode(*late, tail)] * 2)
    writer.write_shard("b_early", [5, 7], [2, 2], [writer.encode(*early, tail)] * 2)
    writer.finish(2)
    reader = StoreReader(str(tmp_path))
    assert reader.num_samples == 3
    assert reader.step_of(5) == 9
    ids, _, _ = reader.get(5)
    assert np.array_equal(np.sort(ids[0][ids[0] >= 0]), np.sort(late[0][0][late[0][0] >= 0]))
    reader.close()


def test_a_damaged_shard_is_not_done(tmp_path):
    """A rerun dump rewrites shards damaged after they were written (and keeps good ones)."""
    writer = StoreWriter(str(tmp_path), header(1000, 8, 6))
    rng = np.random.default_rng(2)
    blocks = [
        writer.encode(*random_entries(rng, 8, 6, 1000, min_kept=1), np.zeros(8)) for _ in range(4)
    ]
    writer.write_shard(0, [0, 1, 2, 3], [-1] * 4, blocks)
    assert writer.shard_done(0)
    path = writer.shard_path(0)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert not writer.shard_done(0)
    with pytest.raises(ValueError, match=r"shard_00000.pd: sample 3 is corrupt"):
        F.ShardFile(path).verify()


def test_tail_mass_field_round_trip():
    """log r per token as fp16: a confident teacher's r = 1e-10..1e-30 survives (the 8-bit
    values cannot hold it: 1 - their sum is 0 or off by 1e-2)."""
    rng = np.random.default_rng(3)
    seq, slots, vocab = 40, 10, 151552
    ids, logp = random_entries(rng, seq, slots, vocab, min_kept=1)
    r = np.concatenate([10.0 ** -rng.uniform(1, 30, seq - 4), [0.9, 0.5, 0.05, 0.0]])
    with np.errstate(divide="ignore"):
        log_tail = np.log(r).astype(np.float32)  # r = 0: -inf (nothing dropped)
    codec = F.BlockCodec(seq, slots, F.id_bytes_for(vocab), 8, 16.0, vocab, tail=True)
    raw = codec.encode(ids, logp, log_tail)
    _, _, got = codec.decode(raw)
    assert got.dtype == np.float32 and got.shape == (seq,)
    assert np.isneginf(got[-1])
    relative = np.abs(np.exp(got[:-1].astype(np.float64)) - r[:-1]) / r[:-1]
    assert relative.max() < 0.02  # fp16 log r: |log r| * 2^-11 <= 69 * 2^-11 relative in r
    # r near 1: fp16 rounds log r to 2^-12 absolute, so r to 2.4e-4 relative
    assert np.abs(np.exp(got[-4:-1].astype(np.float64)) - r[-4:-1]).max() < 2.5e-4
    with pytest.raises(ValueError, match="pass log_tail"):
        codec.encode(ids, logp)


def test_decode_checks_ids():
    codec = F.BlockCodec(2, 3, 2, 8, 16.0, vocab_size=100)
    good = codec.encode(np.array([[5, 7, -1], [99, 0, 1]]), np.full((2, 3), -1.0))
    assert codec.decode(good)[0].max() == 99
    small = F.BlockCodec(2, 3, 2, 8, 16.0, vocab_size=99)
    with pytest.raises(ValueError, match="token id 99 is outside the vocabulary of 99"):
        small.decode(good)
    repeated = bytearray(codec.encode(np.array([[5, 6, -1], [1, -1, -1]]), np.zeros((2, 3))))
    repeated[2 + 1] = 0  # the second gap of token 0: id 5 twice
    with pytest.raises(ValueError, match="repeats a kept id"):
        codec.decode(bytes(repeated))


def test_format_1_store_is_read_without_a_tail(tmp_path):
    """A store written before the tail field (format version 1) still reads; log r is None and
    the loss derives r from the kept values."""
    old = header(100, 4, 3)
    old.version = 1
    old.encoding = {k: v for k, v in old.encoding.items() if k != "tail"}
    writer = StoreWriter(str(tmp_path), old)
    entries = random_entries(np.random.default_rng(4), 4, 3, 100, min_kept=1)
    writer.write_shard(0, [0], [-1], [writer.encode(*entries, None)])
    writer.finish(1)
    reader = StoreReader(str(tmp_path))
    assert reader.header.version == 1
    ids, logp, log_tail = reader.get(0)
    assert log_tail is None and (ids >= 0).sum() == (entries[0] >= 0).sum()
    reader.close()
