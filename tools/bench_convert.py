"""Peak memory of checkpoint conversion, streaming vs holding the model, on a model larger than
one safetensors shard.

    python tools/bench_convert.py [--hidden 1024 --layers 16 --ffn 2816 --vocab 32000]

Builds a random Llama-style HF model (bf16, saved in 100 MB shards), then in fresh
subprocesses, side by side:
  * hf-to-megatron (tools/convert_checkpoint.py) and megatron-to-hf back;
  * the same conversion holding the whole model: every tensor loaded into one state dict;
  * a process that only imports what the converter imports (the baseline).
Each reports the peak of its anonymous resident memory (RssAnon, sampled every 10 ms: the
memory a process really holds; memory-mapped safetensors pages are page cache, reclaimable,
and are reported separately as VmHWM). Prints model bytes, largest shard, and each peak above
the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_SAMPLER = r"""
import json, os, runpy, sys, threading, time
peak = {"anon": 0}
def watch():
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak["anon"] = max(peak["anon"], int(line.split()[1]))
        time.sleep(0.01)
threading.Thread(target=watch, daemon=True).start()
mode = sys.argv[1]
if mode == "script":
    sys.argv = sys.argv[2:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit:
        pass
elif mode == "hold":
    import torch
    from safetensors.torch import load_file
    import megatron_pd.models.convert  # noqa: F401  (the same imports)
    state = {}
    for name in sorted(os.listdir(sys.argv[2])):
        if name.endswith(".safetensors"):
            # cloned: in memory, not pages of the memory-mapped file
            loaded = load_file(os.path.join(sys.argv[2], name))
            state.update({k: v.clone() for k, v in loaded.items()})
    torch.save(state, os.path.join(sys.argv[3], "whole.pt"))
else:
    import megatron_pd.models.convert  # noqa: F401
time.sleep(0.05)
with open("/proc/self/status") as f:
    hwm = [int(l.split()[1]) for l in f if l.startswith("VmHWM:")][0]
print("PEAK " + json.dumps({"anon_mb": peak["anon"] / 1024, "hwm_mb": hwm / 1024}))
"""


def _run(*args) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _SAMPLER, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK ")]
    if out.returncode or not lines:
        raise SystemExit(f"{args}: failed\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][5:])


def build_model(directory: str, args) -> dict:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="100MB")
    from megatron_pd.data.corpus import stdlib_corpus_files
    from megatron_pd.data.tokenizer import train_hf_bpe

    train_hf_bpe(stdlib_corpus_files()[:4], directory + "_tok", vocab_size=1000)
    for name in os.listdir(directory + "_tok"):
        os.replace(os.path.join(directory + "_tok", name), os.path.join(directory, name))
    shards = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    sizes = [os.path.getsize(os.path.join(directory, f)) for f in shards]
    return {"bytes": sum(sizes), "shards": len(shards), "largest": max(sizes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    with tempfile.TemporaryDirectory() as tmp:
        hf = os.path.join(tmp, "hf")
        model = build_model(hf, args)
        mb = 1 << 20
        print(
            f"model: {model['bytes'] / mb:,.0f} MB bf16 in {model['shards']} shards "
            f"(largest {model['largest'] / mb:,.0f} MB)"
        )
        base = _run("imports")
        rows = {
            "imports only (baseline)": base,
            "hf-to-megatron (streaming)": _run(
                "script", tool, "hf-to-megatron", "--hf", hf, "--out", os.path.join(tmp, "run")
            ),
            "megatron-to-hf (layer by layer)": _run(
                "script",
                tool,
                "megatron-to-hf",
                "--load",
                os.path.join(tmp, "run"),
                "--out",
                os.path.join(tmp, "back"),
                "--shard-gb",
                "0.1",
            ),
            "holding the whole model (comparison)": _run("hold", hf, tmp),
        }
    print("\n| process | peak RssAnon MB | above baseline MB | x model | VmHWM MB |")
    print("|---|---|---|---|---|")
    for name, peak in rows.items():
        above = peak["anon_mb"] - base["anon_mb"]
        print(
            f"| {name} | {peak['anon_mb']:,.0f} | {above:,.0f} | "
            f"{above / (model['bytes'] / mb):.2f} | {peak['hwm_mb']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
