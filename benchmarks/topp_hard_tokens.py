"""Top-p routing on a trained model: do harder tokens get more experts? ("Harder Tasks Need More Experts")

    python benchmarks/topp_hard_tokens.py --steps 150

Trains the ``topp-small`` preset (p=0.4, entropy loss 1e-4) on the default stdlib corpus, then
scores held-out tokens: per token, the loss of predicting the next token and the number of
experts the routers gave it (mean over MoE layers). Tokens are split into quartiles by loss;
the paper's claim is that the experts per token rise with difficulty.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moekit.data import eval_batches, load_token_data, load_tokenizer, resolve_corpus, split_documents
from moekit.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="runs/topp-small")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    cfg = TrainConfig(
        preset="topp-small",
        max_steps=args.steps,
        out_dir=args.out,
        batch_size=args.batch_size,
        time_limit_s=None,
    )
    result = train(cfg, progress=False)
    print(f"trained {result.step} steps: val loss {result.val_loss:.3f} (unigram {result.unigram_loss:.3f})")
    from moekit.models import MoEForCausalLM

    model = MoEForCausalLM.from_pretrained(result.checkpoint_dir).eval()
    tok = load_tokenizer(result.checkpoint_dir)
    docs = resolve_corpus(cfg.corpus, cfg.max_corpus_bytes)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    data = load_token_data(tok, train_docs, val_docs, cfg.cache_dir, cfg.val_fraction)
    losses, experts = [], []
    with torch.no_grad():
        for batch in eval_batches(data.val, cfg.seq_len, 8, 6):
            out = model(batch[:, :-1])
            loss_T = F.cross_entropy(
                out.logits.reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            )
            used_T = torch.stack([(r.expert_ids >= 0).sum(-1).float() for r in out.routing]).mean(0)
            losses.append(loss_T)
            experts.append(used_T)
    loss_T, used_T = torch.cat(losses), torch.cat(experts)
    order = loss_T.argsort()
    print(f"\n{loss_T.numel()} held-out tokens; mean experts per token {used_T.mean():.2f}")
    print("| token-loss quartile | mean loss (nats) | mean experts per token |")
    print("|---|---|---|")
    for q, idx in enumerate(order.chunk(4)):
        print(
            f"| Q{q + 1} {'(easiest)' if q == 0 else '(hardest)' if q == 3 else ''} | {loss_T[idx].mean():.2f} | {used_T[idx].mean():.3f} |"
        )
    corr = torch.corrcoef(torch.stack([loss_T, used_T]))[0, 1]
    print(f"Pearson correlation of token loss and experts used: {corr:.3f}")


if __name__ == "__main__":
    main()
