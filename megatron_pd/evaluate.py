"""Held-out loss of a model: a megatron_pd run, checkpoint or a Hugging Face model directory.

    python -m megatron_pd.evaluate --load (RUN_DIR | CKPT | HF_DIR) \
        --input (PREFIX | FILE.jsonl | TEXT_DIR | FILE) [--tokenizer PATH] --seq-length N \
        [--tp N] [--pp N] [--json out.json]
    torchrun --nproc_per_node=2 -m megatron_pd.evaluate ... --tp 2

Prints and writes (``--json``: ``nll_per_token``, ``tokens``, ``documents``) the loss in nats
per token. Each document is tokenized as preprocessing writes it (the tokenizer's template
and end-of-document token; a megatron prefix is read as it is); its first N tokens are taken,
and every position after the first is predicted from its prefix. The loss is over the model's
whole output vocabulary - an HF model's ``vocab_size`` rows, a model trained here its true
vocabulary (its padding rows are not part of it) - which is what transformers computes for the
same model, native or exported. With more ranks than tp * pp the documents are split over the
data-parallel replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def load_documents(source: str, tokenizer, json_key: str = "text", limit: int | None = None):
    """Token lists of ``source``: a megatron prefix (read as it is), a .jsonl/.json file, a text
    file or a directory of them (tokenized with ``tokenizer.encode_document``)."""
    from megatron_pd.data.corpus import expand_inputs
    from megatron_pd.data.preprocess import _iter_documents

    if os.path.isfile(source + ".idx") and os.path.isfile(source + ".bin"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megatron_pd.data.datasets import check_data

        check_data([source], tokenizer)
        dataset = IndexedDataset(source)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        return [dataset[i].astype("int64").tolist() for i in range(count)]
    if not os.path.exists(source):
        raise ValueError(f"--input {source}: no such file, directory or megatron prefix")
    files = expand_inputs([source], None)
    docs = []
    for text in _iter_documents(files, json_key):
        ids = tokenizer.encode_document(text)
        if len(ids) > len(tokenizer.encode_document("")):
            docs.append(ids)
        if limit is not None and len(docs) >= limit:
            break
    return docs


def _as_flags(message: str) -> str:
    """The model loader names config fields (it serves distillation too); here they are
    this tool's flags."""
    for field, flag in (
        ("distill.teacher.load=", "--load "),
        ("distill.teacher.tp=", "--tp "),
        ("distill.teacher.pp=", "--pp "),
        ("distill.teacher.precision=", "--precision "),
    ):
        message = message.replace(field, flag)
    return message


def open_model(load: str, tokenizer_path: str | None, tp: int, pp: int, precision: str, seq: int):
    """(FrozenTeacher, tokenizer, evaluation vocabulary) for ``load`` on this rank.

    Collective: builds the model's groups over the whole world (tp x pp, the rest data
    parallel).
    """
    import torch.distributed as dist

    from megatron_pd.config.schema import TeacherConfig
    from megatron_pd.data.tokenizer import load_tokenizer
    from megatron_pd.models.teacher import TeacherSource, open_teacher
    from megatron_pd.parallel import topology
    from megatron_pd.parallel.vocab import VocabInfo

    source = TeacherSource(load)
    if tokenizer_path is None:
        if source.kind == "hf":
            tokenizer_path = source.path
        elif source.run_config is not None:
            from megatron_pd.config.loader import load_config

            tokenizer_path = load_config(source.run_config).data.tokenizer_model
    if not tokenizer_path:
        raise ValueError(f"--load {load}: no tokenizer found next to it; pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_path)
    groups = topology.init_student_groups(tp, pp)
    config = TeacherConfig(load=load, tp=tp, pp=pp, precision=precision)
    teacher, _ = open_teacher(
        config, groups, tokenizer.vocab_size, tokenizer.fingerprint, seq, dist.get_rank(groups.tp)
    )
    # an imported model's own output rows (not the zero rows its checkpoint is padded with)
    rows = teacher.cfg.hf_vocab_rows or teacher.cfg.padded_vocab_size or tokenizer.vocab_size
    vocab = teacher.vocab
    teacher.vocab = VocabInfo(int(rows), vocab.padded_size, vocab.tp_size, vocab.tp_rank)
    return teacher, tokenizer, teacher.vocab


def held_out_loss(teacher, documents: list, seq_length: int, batch_size: int, dp_group) -> dict:
    """Sum of next-token CE and token count over ``documents`` (first seq_length tokens each),
    this data-parallel rank taking every dp_size-th document; reduced over the world."""
    import torch.distributed as dist

    dp_rank, dp_size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    mine = [d[:seq_length] for d in documents[dp_rank::dp_size] if len(d) >= 2]
    totals = torch.zeros(2, dtype=torch.float64, device=teacher.device)
    # the same number of batches on every rank (the model's collectives must match)
    steps = torch.tensor([-(-len(mine) // batch_size)], device=teacher.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    for step in range(int(steps.item())):
        batch = mine[step * batch_size : (step + 1) * batch_size] or [[0, 0]]
        width = max(len(d) for d in batch) - 1
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width)
        for row, doc in enumerate(batch):
            n = len(doc) - 1
            tokens[row, :n] = torch.tensor(doc[:-1])
            labels[row, :n] = torch.tensor(doc[1:])
            mask[row, :n] = 1.0
        if step * batch_size >= len(mine):
            mask.zero_()  # a rank out of documents runs a dummy batch
        out = teacher.lm_loss(tokens, labels, mask)
        if out is not None and dist.get_rank(teacher.groups.tp) == 0:
            totals += torch.stack([out[0].double(), out[1].double()])
    dist.all_reduce(totals)
    return {"nll_sum": totals[0].item(), "tokens": int(totals[1].item())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="run dir, checkpoint or HF model dir")
    parser.add_argument("--input", required=True, help="megatron prefix, .jsonl, text file or dir")
    parser.add_argument("--tokenizer", help="default: the run's or the HF directory's")
    parser.add_argument("--seq-length", type=int, required=True, help="tokens per document")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--json-key", default="text", help="document field of jsonl inputs")
    parser.add_argument("--max-documents", type=int)
    parser.add_argument("--json", help="also write the result to this file")
    return parser


def evaluate(args) -> dict:
    import torch.distributed as dist

    from megatron_pd.parallel import topology

    if args.seq_length < 2:
        raise ValueError(f"--seq-length={args.seq_length}: must be >= 2")
    rank, world = topology.init_distributed()
    if world % (args.tp * args.pp):
        raise ValueError(f"--tp {args.tp} x --pp {args.pp} must divide the world size {world}")
    teacher, tokenizer, vocab = open_model(
        args.load, args.tokenizer, args.tp, args.pp, args.precision, args.seq_length
    )
    documents = load_documents(args.input, tokenizer, args.json_key, args.max_documents)
    if not documents:
        raise ValueError(f"--input {args.input}: no documents with at least 2 tokens")
    sums = held_out_loss(teacher, documents, args.seq_length, args.batch_size, teacher.groups.dp)
    result = {
        "nll_per_token": sums["nll_sum"] / max(sums["tokens"], 1),
        "tokens": sums["tokens"],
        "documents": len(documents),
        "seq_length": args.seq_length,
        "vocabulary": vocab.true_size,
        "load": os.path.abspath(args.load),
        "input": os.path.abspath(args.input),
    }
    if rank == 0:
        print(
            f"{args.load}: {result['nll_per_token']:.6f} nats/token over {result['tokens']:,} "
            f"tokens ({result['documents']} documents, first {args.seq_length} tokens each)",
            flush=True,
        )
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, args.json)
    dist.barrier()
    return result


def main(argv=None) -> int:
    from megatron_pd.platform import quiet_known_warnings

    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        evaluate(args)
    except ValueError as err:
        if rank == 0:
            print(f"error: {_as_flags(str(err))}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from megatron_pd.parallel import topology

            topology.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
