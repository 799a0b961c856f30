"""Checkpoint conversion: a Hugging Face model in (a megatron_pd run directory), a student out.

``import_hf(hf_dir, run_dir)`` writes a megatron_pd run directory - ``config.yaml`` (the model
read from config.json, the tokenizer copied to ``run_dir/tokenizer``), ``checkpoints/
iter_0000000`` (a megatron dist checkpoint holding the model only) and ``latest`` - streaming
tensor by tensor: each layer's megatron tensor is built from its HF slices when the checkpoint
writer asks for it and dropped once written (models/dcp_io.py), so the peak memory is about
one layer, not the model. The result loads at any TP/PP (as a teacher, ``evaluate``, or a
student's ``checkpoint.init_from``). ``keep_layers`` keeps a subset of the HF layers, in
order (a pruned initialisation).

``export_hf(load, out_dir)`` writes an HF model directory from a megatron_pd run, checkpoint
root or checkpoint: config.json of the architecture that expresses the model exactly
(models/hf_config.py; a student no HF architecture can express is an error naming the field),
sharded safetensors with their index, generation_config.json and the tokenizer files - read
layer by layer from the dist checkpoint, written atomically (a temporary directory renamed).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time

import torch

from megatron_pd.models import dcp_io
from megatron_pd.models.hf_config import (
    family_for_model,
    hf_config_for_model,
    model_config_from_hf,
    read_hf_config,
)
from megatron_pd.models.hf_weights import HFLayout, SafetensorsIndex

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ROWS_PER_CHUNK = 16384  # embedding/output chunks: 16k rows at a time
# An imported embedding's rows are padded (zero rows, outside the vocabulary) to a multiple of
# this, so the checkpoint divides into any tensor-parallel size up to 128 that is a power of 2.
ROW_MULTIPLE = 128


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------ keys
def megatron_keys(model_cfg) -> dict:
    """{checkpoint key: per-layer (or whole) global shape} of a GPTModel with ``model_cfg``."""
    m = model_cfg
    H, hd = m.hidden_size, m.head_dim
    qkv_rows = (m.num_attention_heads + 2 * m.query_groups) * hd
    rows = int(m.padded_vocab_size)
    layer = {
        "self_attention.linear_qkv.layer_norm_weight": (H,),
        "self_attention.linear_qkv.weight": (qkv_rows, H),
        "self_attention.linear_proj.weight": (H, m.num_attention_heads * hd),
        "mlp.linear_fc1.layer_norm_weight": (H,),
        "mlp.linear_fc1.weight": (2 * m.ffn_hidden_size, H),
        "mlp.linear_fc2.weight": (H, m.ffn_hidden_size),
    }
    if m.add_qkv_bias:
        layer["self_attention.linear_qkv.bias"] = (qkv_rows,)
    if m.qk_layernorm:
        layer["self_attention.q_layernorm.weight"] = (hd,)
        layer["self_attention.k_layernorm.weight"] = (hd,)
    keys = {"embedding.word_embeddings.weight": (rows, H), "decoder.final_layernorm.weight": (H,)}
    if not m.tie_embeddings:
        keys["output_layer.weight"] = (rows, H)
    keys.update({f"decoder.layers.{k}": (m.num_layers,) + v for k, v in layer.items()})
    return keys


def _proxy_objects(model_cfg) -> list:
    """The sharded-object keys a GPTModel of this kind saves for one layer (its modules'
    ``_extra_state``), read off a one-layer model of the same kind built here."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_pd.models.gpt import build_gpt_model
    from megatron_pd.parallel import topology
    from megatron_pd.parallel.vocab import VocabInfo

    proxy = replace(
        model_cfg,
        num_layers=1,
        hidden_size=8 * model_cfg.num_attention_heads,
        kv_channels=8,
        ffn_hidden_size=16,
        padded_vocab_size=16,
        vocab_size=16,
        rope_scaling="none",
    )
    groups = topology.init_student_groups(1, 1)
    model = build_gpt_model(proxy, VocabInfo(16, 16, 1, 0), groups, torch.float32, 0, 8)
    keys = []
    for value in nested_values(model.sharded_state_dict()):
        if isinstance(value, ShardedObject):
            keys.append(value.unique_key)
    return keys


def _object_keys(model_cfg) -> list:
    """Every sharded-object key of the real model (the proxy's, one per layer)."""
    out = []
    for key in _proxy_objects(model_cfg):
        base, _, shard = key.rpartition("/shard_")
        if base.startswith("decoder.layers.") and shard == "0_1":
            out.extend(
                f"{base}/shard_{i}_{model_cfg.num_layers}" for i in range(model_cfg.num_layers)
            )
        else:
            out.append(key)
    return out


# ------------------------------------------------------------------------------ import
def import_hf(
    hf_dir: str,
    run_dir: str,
    dtype: str | None = None,
    keep_layers: list | None = None,
    seq_length: int | None = None,
) -> dict:
    """Convert an HF model directory into a megatron_pd run directory; returns a summary.

    Runs in one process (it starts a one-rank gloo group if none exists).
    """
    from megatron_pd.config.loader import save_config
    from megatron_pd.config.schema import Config, DataConfig
    from megatron_pd.data.tokenizer import HFTokenizer
    from megatron_pd.models.checkpoint import LATEST, checkpoint_name
    from megatron_pd.parallel import topology

    start = time.monotonic()
    config = read_hf_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    tokenizer = (
        HFTokenizer(hf_dir) if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else None
    )
    model, family = model_config_from_hf(
        config, where, seq_length, tokenizer.vocab_size if tokenizer else None
    )
    index = SafetensorsIndex(hf_dir)
    hf_rows = int(model.padded_vocab_size)
    layout = HFLayout(model, family, hf_rows)
    layout.check_complete(index)
    from dataclasses import replace

    padded = -(-hf_rows // ROW_MULTIPLE) * ROW_MULTIPLE
    model = replace(model, padded_vocab_size=padded, hf_vocab_rows=hf_rows)
    hf_layers = list(range(model.num_layers))
    if keep_layers is not None:
        bad = [i for i in keep_layers if not 0 <= i < model.num_layers]
        if bad or not keep_layers:
            raise ValueError(
                f"keep_layers={keep_layers}: layers must be in [0, {model.num_layers}) "
                f"(the model has {model.num_layers})"
            )
        hf_layers = list(keep_layers)
        model = replace(model, num_layers=len(hf_layers))
    store_dtype = _DTYPES.get(dtype or config.get("torch_dtype") or config.get("dtype") or "")
    store_dtype = store_dtype or torch.bfloat16
    topology.init_distributed()
    entries = []
    for key, shape in megatron_keys(model).items():
        if key.startswith("decoder.layers."):
            chunks = dcp_io.layer_chunks(shape)

            def produce(offsets, sizes, key=key):
                region = tuple(slice(o, o + s) for o, s in zip(offsets[1:], sizes[1:]))
                return layout.region(index, key, hf_layers[offsets[0]], region)[None]

        else:
            chunks = _row_chunks(shape)

            def produce(offsets, sizes, key=key):
                region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
                return layout.region(index, key, None, region)

        entries.append(dcp_io.TensorEntry(key, shape, store_dtype, chunks, produce))
    objects = {k: dcp_io.serialized_object(None) for k in _object_keys(model)}
    checkpoints = os.path.join(run_dir, "checkpoints")
    trainer = {
        "step": 0,
        "tokenizer_fingerprint": tokenizer.fingerprint if tokenizer else None,
        "converted_from": os.path.abspath(hf_dir),
        "hf_layers": hf_layers,
    }
    final = os.path.join(checkpoints, checkpoint_name(0))
    dcp_io.write_checkpoint(final, entries, objects, {"trainer": trainer})
    tmp_latest = os.path.join(checkpoints, LATEST + ".tmp")
    with open(tmp_latest, "w") as f:
        f.write(checkpoint_name(0) + "\n")
    os.replace(tmp_latest, os.path.join(checkpoints, LATEST))
    data = DataConfig(seq_length=min(model.max_position_embeddings or 4096, 4096))
    if tokenizer is not None:
        target = os.path.join(run_dir, "tokenizer")
        os.makedirs(target, exist_ok=True)
        for path in tokenizer.files():
            shutil.copy(path, os.path.join(target, os.path.basename(path)))
        data.tokenizer_model = os.path.abspath(target)
    cfg = Config(run_dir=os.path.abspath(run_dir), model=model, data=data)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    tensors = sum(len(e.chunks) for e in entries)
    return {
        "architecture": family.architecture,
        "layers": model.num_layers,
        "chunks": tensors,
        "checkpoint": final,
        "dtype": str(store_dtype).replace("torch.", ""),
        "seconds": time.monotonic() - start,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _row_chunks(shape: tuple) -> list:
    if len(shape) != 2:
        return dcp_io.whole(shape)
    rows = shape[0]
    return [
        ((r, 0), (min(_ROWS_PER_CHUNK, rows - r), shape[1]))
        for r in range(0, rows, _ROWS_PER_CHUNK)
    ]


# ------------------------------------------------------------------------------ export
def resolve_run(load: str) -> tuple:
    """(checkpoint directory, Config) of a megatron_pd run directory, root or checkpoint."""
    from megatron_pd.config.loader import load_config
    from megatron_pd.models.teacher import TeacherSource

    source = TeacherSource(load)
    if source.kind != "megatron":
        raise ValueError(f"{load} is a Hugging Face model directory, not a megatron_pd checkpoint")
    if source.run_config is None:
        raise ValueError(
            f"{load}: no config.yaml next to the checkpoint (the model's shape and tokenizer "
            "come from the run's config.yaml)"
        )
    return source.checkpoint, load_config(source.run_config)


def export_hf(
    load: str, out_dir: str, dtype: str | None = None, shard_bytes: int = 4 << 30
) -> dict:
    """Write ``out_dir`` as an HF model directory from a megatron_pd checkpoint; ``dtype``
    None keeps the checkpoint's own (exact)."""
    from megatron_pd.data.tokenizer import load_tokenizer

    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(_DTYPES)}")
    start = time.monotonic()
    checkpoint, cfg = resolve_run(load)
    model = cfg.model
    family = family_for_model(model)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model) if cfg.data.tokenizer_model else None
    true_vocab = model.vocab_size or (tokenizer.vocab_size if tokenizer else None)
    if true_vocab is None:
        raise ValueError("model.vocab_size is unset and the run has no data.tokenizer_model")
    # an imported model gets its own rows back; one trained here drops megatron's padding
    rows = int(model.hf_vocab_rows or model.padded_vocab_size or true_vocab)
    from dataclasses import replace

    layout = HFLayout(replace(model, padded_vocab_size=rows), family, rows)
    source = dcp_io.CheckpointTensors(checkpoint)
    if dtype is None:
        stored = source.tensors["embedding.word_embeddings.weight"].properties.dtype
        dtype = {v: k for k, v in _DTYPES.items()}.get(stored, "float32")
    target_dtype = _DTYPES[dtype]
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    writer = _ShardWriter(tmp, shard_bytes)
    keys = megatron_keys(
        replace(model, padded_vocab_size=source.shape("embedding.word_embeddings.weight")[0])
    )
    for key in keys:
        if not key.startswith("decoder.layers.") and key != "decoder.final_layernorm.weight":
            if key in source.tensors:
                tensor = source.read(key, dtype=target_dtype)
                writer.add(layout.to_hf(key, None, tensor))
    for layer in range(model.num_layers):
        for key in keys:
            if key.startswith("decoder.layers."):
                sizes = (1,) + tuple(source.shape(key)[1:])
                tensor = source.read(key, (layer,) + (0,) * (len(sizes) - 1), sizes, target_dtype)
                writer.add(layout.to_hf(key, layer, tensor[0]))
    writer.add(
        layout.to_hf(
            "decoder.final_layernorm.weight",
            None,
            source.read("decoder.final_layernorm.weight", dtype=target_dtype),
        )
    )
    files = writer.finish()
    config = hf_config_for_model(model, rows, tokenizer, dtype)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = {"_from_model_config": True}
    if tokenizer is not None:
        generation.update(eos_token_id=tokenizer.eod)
        if getattr(tokenizer, "pad_token_id", None) is not None:
            generation["pad_token_id"] = tokenizer.pad_token_id
        if tokenizer.bos is not None:
            generation["bos_token_id"] = tokenizer.bos
        _export_tokenizer(tokenizer, tmp)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return {
        "architecture": family.architecture,
        "files": files,
        "rows": rows,
        "seconds": time.monotonic() - start,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _export_tokenizer(tokenizer, out_dir: str) -> None:
    if tokenizer.kind == "huggingface":
        for path in tokenizer.files():
            if os.path.basename(path) != "generation_config.json":
                shutil.copy(path, os.path.join(out_dir, os.path.basename(path)))
        return
    raise ValueError(
        f"data.tokenizer_model={tokenizer.path} is a SentencePiece model: the export needs an "
        "HF tokenizer (tokenizer.json) that transformers and lm-eval load as it is; train one "
        "with tools/train_tokenizer.py --model-type hf-bpe"
    )


class _ShardWriter:
    """Collects HF tensors into safetensors files of at most ``limit`` bytes each."""

    def __init__(self, directory: str, limit: int):
        self.directory, self.limit = directory, limit
        self.pending, self.pending_bytes, self.written = {}, 0, []

    def add(self, tensors: dict) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.limit:
                self._flush()
            self.pending[name] = tensor.contiguous().clone()
            self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.directory, f"part-{len(self.written):05d}.safetensors")
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list:
        if self.pending:
            self._flush()
        count = len(self.written)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map = {}
        for (path, tensors), name in zip(self.written, names):
            os.replace(path, os.path.join(self.directory, name))
            weight_map.update({t: name for t in tensors})
        if count > 1:
            total = sum(os.path.getsize(os.path.join(self.directory, n)) for n in names)
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1
                )
        return names
