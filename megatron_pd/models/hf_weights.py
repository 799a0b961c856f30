"""Hugging Face safetensors <-> megatron-core GPTModel weights, slice by slice.

``SafetensorsIndex`` knows which file of an HF model directory holds each tensor (from
``model.safetensors.index.json``, or by listing the files) and reads *slices* of tensors
(memory-mapped; nothing is unpickled: a directory with only ``.bin``/``.pt`` pickles is an
error). ``load_hf_weights(model, ...)`` fills one rank's shard of a megatron GPTModel: it walks
the model's sharded state dict - the same description of each parameter's global tensor and
this rank's region that dist_checkpointing uses - and reads exactly that region from the
HF tensors, so a rank at TP=8 reads an eighth of each matrix and a pipeline stage only its
own layers. ``megatron_to_hf(...)`` maps a megatron global tensor back to HF names (export).

Layouts (megatron global tensor per layer; HF per family, see models/hf_config.py):
* linear_qkv [groups * (heads/groups + 2) * head_dim, H]: per key/value group its query heads,
  then its key head, then its value head; HF has q_proj, k_proj, v_proj (+ biases).
* linear_fc1 [2 * ffn, H]: [gate; up] (gate_proj, up_proj; GLM's gate_up_proj is [gate; up]).
* linear_proj [H, heads * head_dim] (o_proj), linear_fc2 [H, ffn] (down_proj).
* norms: input_layernorm -> linear_qkv.layer_norm_weight, post_attention_layernorm ->
  linear_fc1.layer_norm_weight, q_norm/k_norm -> q_layernorm/k_layernorm, model.norm ->
  decoder.final_layernorm.
* embedding / output layer [padded rows, H]: rows past the HF tensor's rows are zero.
"""

from __future__ import annotations

import glob
import json
import os

import torch

INDEX_FILE = "model.safetensors.index.json"
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class SafetensorsIndex:
    """The tensors of an HF model directory; every error names the file or tensor."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self._handles: dict = {}
        index = os.path.join(model_dir, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{index} is not a safetensors index ({err})") from None
            missing = sorted({f for f in weight_map.values()} - set(os.listdir(model_dir)))
            if missing:
                raise ValueError(
                    f"{index} names shard {missing[0]}, which is missing from {model_dir}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            self.file_of = {name: os.path.join(model_dir, f) for name, f in weight_map.items()}
            return
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
        if not files:
            pickles = sorted(
                os.path.basename(p)
                for pattern in _PICKLES
                for p in glob.glob(os.path.join(model_dir, pattern))
            )
            if pickles:
                raise ValueError(
                    f"{model_dir} holds only pickle checkpoints ({', '.join(pickles[:3])}): "
                    "megatron_pd loads safetensors only (unpickling a file can run code); "
                    "save the model with safetensors (save_pretrained(safe_serialization=True))"
                )
            raise ValueError(f"{model_dir} has no *.safetensors weights")
        self.file_of = {}
        for path in files:
            for name in self._open(path).keys():
                self.file_of[name] = path

    def _open(self, path: str):
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(path, framework="pt")
            except Exception as err:  # SafetensorError, OSError: name the file
                raise ValueError(
                    f"safetensors file {path} cannot be read ({type(err).__name__}: {err}); "
                    "it may be truncated or not a safetensors file"
                ) from None
            self._handles[path] = handle
        return handle

    def has(self, name: str) -> bool:
        return name in self.file_of

    def _slice(self, name: str):
        path = self.file_of.get(name)
        if path is None:
            raise ValueError(f"{self.model_dir} has no tensor {name}")
        handle = self._open(path)
        try:
            return handle.get_slice(name), path
        except Exception as err:
            raise ValueError(f"{path}: tensor {name} cannot be read ({err})") from None

    def shape(self, name: str) -> tuple:
        return tuple(self._slice(name)[0].get_shape())

    def read(self, name: str, expected: tuple, rows=None, cols=None) -> torch.Tensor:
        """Tensor ``name`` (or its [rows] / [:, cols] slice), after checking its full shape."""
        piece, path = self._slice(name)
        shape = tuple(piece.get_shape())
        if shape != tuple(expected):
            raise ValueError(
                f"{path}: tensor {name} has shape {list(shape)}, config.json implies "
                f"{list(expected)}"
            )
        try:
            if rows is not None:
                return piece[rows.start : rows.stop]
            if cols is not None:
                return piece[:, cols.start : cols.stop]
            return piece[:]
        except Exception as err:  # a file shorter than its header says
            raise ValueError(f"{path}: tensor {name} cannot be read ({err})") from None


class HFLayout:
    """Names and shapes of one model's HF tensors, and their mapping to megatron regions."""

    def __init__(self, model_cfg, family, rows: int):
        self.cfg, self.family, self.rows = model_cfg, family, rows
        m = model_cfg
        self.hidden, self.head_dim = m.hidden_size, m.head_dim
        self.groups, self.heads = m.query_groups, m.num_attention_heads
        self.per_group = self.heads // self.groups
        self.ffn = m.ffn_hidden_size

    # ------------------------------------------------------------------ HF names and shapes
    @staticmethod
    def layer_name(layer: int, name: str) -> str:
        return f"model.layers.{layer}.{name}"

    def shapes(self, layer: int | None = None) -> dict:
        """Every HF tensor of the model (of one layer when given) with its shape."""
        H, hd = self.hidden, self.head_dim
        if layer is None:
            out = {"model.embed_tokens.weight": (self.rows, H), "model.norm.weight": (H,)}
            if not self.cfg.tie_embeddings:
                out["lm_head.weight"] = (self.rows, H)
            return out
        names = {
            "input_layernorm.weight": (H,),
            "post_attention_layernorm.weight": (H,),
            "self_attn.q_proj.weight": (self.heads * hd, H),
            "self_attn.k_proj.weight": (self.groups * hd, H),
            "self_attn.v_proj.weight": (self.groups * hd, H),
            "self_attn.o_proj.weight": (H, self.heads * hd),
            "mlp.down_proj.weight": (H, self.ffn),
        }
        if self.cfg.add_qkv_bias:
            names.update(
                {
                    "self_attn.q_proj.bias": (self.heads * hd,),
                    "self_attn.k_proj.bias": (self.groups * hd,),
                    "self_attn.v_proj.bias": (self.groups * hd,),
                }
            )
        if self.cfg.qk_layernorm:
            names.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
        if self.family.fused_gate_up:
            names["mlp.gate_up_proj.weight"] = (2 * self.ffn, H)
        else:
            names.update(
                {"mlp.gate_proj.weight": (self.ffn, H), "mlp.up_proj.weight": (self.ffn, H)}
            )
        return {self.layer_name(layer, k): v for k, v in names.items()}

    def read(self, index: SafetensorsIndex, name: str, rows=None, cols=None) -> torch.Tensor:
        layer = None
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
        return index.read(name, self.shapes(layer)[name], rows=rows, cols=cols)

    # ------------------------------------------------------------------ megatron regions
    def region(self, index: SafetensorsIndex, key: str, layer: int | None, region: tuple):
        """The megatron global tensor's ``region`` (a tuple of slices) of parameter ``key``."""
        H = self.hidden
        if key == "embedding.word_embeddings.weight":
            return self._rows_of(index, "model.embed_tokens.weight", region)
        if key == "output_layer.weight":
            name = "model.embed_tokens.weight" if self.cfg.tie_embeddings else "lm_head.weight"
            return self._rows_of(index, name, region)
        if key == "decoder.final_layernorm.weight":
            return self.read(index, "model.norm.weight")[region]
        short = key.removeprefix("decoder.layers.")
        name = lambda n: self.layer_name(layer, n)  # noqa: E731
        simple = {
            "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
            "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
            "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
        }
        if short in simple:
            return self.read(index, name(simple[short]))[region]
        if short in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            return self._qkv(index, layer, short.rsplit(".", 1)[1], region)
        if short == "self_attention.linear_proj.weight":
            return self.read(index, name("self_attn.o_proj.weight"), cols=region[1])[region[0]]
        if short == "mlp.linear_fc2.weight":
            return self.read(index, name("mlp.down_proj.weight"), cols=region[1])[region[0]]
        if short == "mlp.linear_fc1.weight":
            rows = region[0]
            if self.family.fused_gate_up:
                return self.read(index, name("mlp.gate_up_proj.weight"), rows=rows)[:, region[1]]
            parts = []
            for offset, hf in ((0, "mlp.gate_proj.weight"), (self.ffn, "mlp.up_proj.weight")):
                lo, hi = max(rows.start, offset), min(rows.stop, offset + self.ffn)
                if lo < hi:
                    parts.append(self.read(index, name(hf), rows=slice(lo - offset, hi - offset)))
            return torch.cat(parts)[:, region[1]]
        raise ValueError(f"no Hugging Face tensor maps to megatron parameter {key} (H={H})")

    def _rows_of(self, index, name: str, region: tuple) -> torch.Tensor:
        rows, cols = region
        have = min(rows.stop, self.rows)
        part = self.read(index, name, rows=slice(min(rows.start, have), have))
        if have - rows.start < rows.stop - rows.start:  # padded rows beyond the HF tensor
            pad = torch.zeros(rows.stop - max(rows.start, have), part.shape[1], dtype=part.dtype)
            part = torch.cat([part, pad])
        return part[:, cols]

    def _qkv(self, index, layer: int, kind: str, region: tuple) -> torch.Tensor:
        hd, per = self.head_dim, self.per_group
        block = (per + 2) * hd  # rows of one key/value group
        rows = region[0]
        first, last = rows.start // block, -(-rows.stop // block)
        q = self.read(
            index,
            self.layer_name(layer, f"self_attn.q_proj.{kind}"),
            rows=slice(first * per * hd, last * per * hd),
        )
        k, v = (
            self.read(
                index,
                self.layer_name(layer, f"self_attn.{p}_proj.{kind}"),
                rows=slice(first * hd, last * hd),
            )
            for p in ("k", "v")
        )
        n = last - first
        tail = q.shape[1:]
        mixed = torch.cat(
            [q.reshape(n, per * hd, *tail), k.reshape(n, hd, *tail), v.reshape(n, hd, *tail)],
            dim=1,
        ).reshape(n * block, *tail)
        local = slice(rows.start - first * block, rows.stop - first * block)
        return mixed[(local,) + tuple(region[1:])]

    # ------------------------------------------------------------------ export
    def to_hf(self, key: str, layer: int | None, tensor: torch.Tensor) -> dict:
        """HF tensors from one megatron global tensor (a layer's, for layer keys)."""
        if key == "embedding.word_embeddings.weight":
            return {"model.embed_tokens.weight": tensor[: self.rows]}
        if key == "output_layer.weight":
            return {} if self.cfg.tie_embeddings else {"lm_head.weight": tensor[: self.rows]}
        if key == "decoder.final_layernorm.weight":
            return {"model.norm.weight": tensor}
        short = key.removeprefix("decoder.layers.")
        name = lambda n: self.layer_name(layer, n)  # noqa: E731
        simple = {
            "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
            "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
            "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
            "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
            "mlp.linear_fc2.weight": "mlp.down_proj.weight",
        }
        if short in simple:
            return {name(simple[short]): tensor}
        if short in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = short.rsplit(".", 1)[1]
            hd, per = self.head_dim, self.per_group
            tail = tensor.shape[1:]
            grouped = tensor.reshape(self.groups, (per + 2) * hd, *tail)
            q, k, v = grouped.split([per * hd, hd, hd], dim=1)
            return {
                name(f"self_attn.q_proj.{kind}"): q.reshape(-1, *tail),
                name(f"self_attn.k_proj.{kind}"): k.reshape(-1, *tail),
                name(f"self_attn.v_proj.{kind}"): v.reshape(-1, *tail),
            }
        if short == "mlp.linear_fc1.weight":
            if self.family.fused_gate_up:
                return {name("mlp.gate_up_proj.weight"): tensor}
            gate, up = tensor.split(self.ffn)
            return {name("mlp.gate_proj.weight"): gate, name("mlp.up_proj.weight"): up}
        raise ValueError(f"megatron parameter {key} has no Hugging Face equivalent")

    def check_complete(self, index: SafetensorsIndex) -> None:
        """ValueError naming the first tensor the model needs that the directory lacks, or
        whose shape (from the safetensors headers: no data read) config.json contradicts."""
        wanted = dict(self.shapes())
        for layer in range(self.cfg.num_layers):
            wanted.update(self.shapes(layer))
        if self.cfg.tie_embeddings and index.has("lm_head.weight"):
            pass  # a tied checkpoint may still carry lm_head: it is ignored
        for name, expected in wanted.items():
            if not index.has(name):
                raise ValueError(
                    f"{index.model_dir} has no tensor {name} (config.json describes "
                    f"{self.family.architecture} with {self.cfg.num_layers} layers)"
                )
            shape = index.shape(name)
            if shape != tuple(expected):
                raise ValueError(
                    f"{index.file_of[name]}: tensor {name} has shape {list(shape)}, config.json "
                    f"implies {list(expected)}"
                )


@torch.no_grad()
def load_hf_weights(model, index: SafetensorsIndex, layout: HFLayout) -> None:
    """Fill this rank's stage/shard of ``model`` from HF tensors (only its own regions read).

    Every parameter is first set to NaN; one not written afterwards is a ValueError.
    """
    from megatron_pd.models.init import _sharded_tensors

    layout.check_complete(index)
    from megatron_pd.platform.faults import fault

    for param in model.parameters():
        param.fill_(float("nan"))
    for number, shard in enumerate(_sharded_tensors(model)):
        if number == 2:
            fault("teacher_load")
        if shard.data is None or not shard.data.is_floating_point():
            continue
        n_pre = shard.prepend_axis_num
        layer = int(shard.global_offset[0]) if n_pre else None
        offsets = shard.global_offset[n_pre:]
        region = tuple(
            slice(int(o), int(o) + int(size)) for o, size in zip(offsets, shard.data.shape)
        )
        values = layout.region(index, shard.key, layer, region)
        shard.data.copy_(values.to(shard.data.dtype))
    missing = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
    if missing:
        raise ValueError(f"{index.model_dir}: weights left unloaded: {missing[:5]}")
