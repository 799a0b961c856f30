"""lm-evaluation-harness backend for megatron_pd checkpoints, registered as ``megatron_pd``.

    python -m megatron_pd.harness --model megatron_pd --model_args load=RUN_DIR[,tokenizer=PATH]\
        [,max_length=2048,precision=fp32,batch_size=8] --tasks hellaswag ...

``python -m megatron_pd.harness`` is lm-eval's own command line with this backend registered
(lm-eval registers models by name when their module is imported). ``load`` takes what
``megatron_pd.evaluate --load`` takes: a run directory, a checkpoint (any TP/PP it was saved
with) or an HF model directory, so intermediate checkpoints are scored without an export.
Requests are scored exactly as lm-eval's ``hf`` backend scores an exported model: the same
tokenization (the tokenizer's template; the BOS, else EOS, as the context of an empty one),
the same left truncation to ``max_length``, log-softmax over the model's output vocabulary,
greedy generation until a stop string. One process, TP = PP = 1 (CUDA when present).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


@register_model("megatron_pd")
class MegatronPDLM(TemplateLM):
    """A megatron_pd (or HF) checkpoint behind lm-eval's request interface."""

    def __init__(
        self,
        load: str,
        tokenizer: str | None = None,
        max_length: int | None = None,
        precision: str = "fp32",
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        **unused,
    ):
        super().__init__()
        from megatron_pd.evaluate import open_model
        from megatron_pd.parallel import topology
        from megatron_pd.platform import quiet_known_warnings

        quiet_known_warnings()
        topology.init_distributed()
        self.model, tok, self.vocab = open_model(
            load, tokenizer, 1, 1, precision, int(max_length or 2048)
        )
        self.tok = tok
        self._max_length = int(max_length or self.model.cfg.max_position_embeddings or 2048)
        if tok.kind != "huggingface":
            raise ValueError(
                f"tokenizer {tok.path}: lm-eval tasks need the HF tokenizer the exported model "
                "would carry (a SentencePiece model is not one)"
            )
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ tokenization
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos if self.tok.bos is not None else self.tok.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
        if add_special_tokens is None:
            prefix = self.tok.detokenize([self.prefix_token_id])
            add_special_tokens = not (prefix and string.startswith(prefix))
        return self.tok.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens) -> str:
        return self.tok.detokenize(tokens)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _log_probs(self, inputs: list) -> list:
        """Per input token list: [len, V] log-probabilities of the next token."""
        width = max(len(x) for x in inputs)
        batch = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids)
        logits = self.model.logits(batch)[..., : self.vocab.true_size].float()
        return [F.log_softmax(logits[row, : len(ids)], dim=-1) for row, ids in enumerate(inputs)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        results = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
            for (_, _, cont), logp in zip(chunk, self._log_probs(inputs)):
                picked = logp[-len(cont) :]
                target = torch.tensor(cont)
                greedy = bool((picked.argmax(-1) == target).all())
                results.append((float(picked.gather(1, target[:, None]).sum()), greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [
                (None,) + make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens(windows)
            out.append(sum(score for score, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        out = []
        for context, options in [req.args for req in requests]:
            options = dict(options or {})
            until = options.get("until") or [self.tok.detokenize([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            limit = int(options.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-(self.max_length - limit) :]
            generated = []
            for _ in range(limit):
                next_id = int(self._log_probs([ids + generated])[0][-1].argmax())
                if next_id == self.eot_token_id:
                    break
                generated.append(next_id)
                text = self.tok.detokenize(generated)
                if any(stop in text for stop in until):
                    break
            text = self.tok.detokenize(generated)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main() -> None:
    """lm-eval's command line, with the ``megatron_pd`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
