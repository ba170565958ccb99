"""Small experiments that show the routing papers' claims at the layer level, on random data.

    python benchmarks/layer_claims.py

1. Top-p routing ("Harder Tasks Need More Experts"): tokens whose router distribution is flatter
   (higher entropy, the router is less sure) get more experts.
2. Random token selection (DeepSpeed multitask MoE): when an expert overflows, RTS drops tokens
   uniformly over positions; position-based dropping always drops the end of the batch.
3. Aux-loss-free balancing (DeepSeek-V3): the selection bias evens out a skewed router without
   any gradient.
"""

from __future__ import annotations

import torch

from moekit.layers import ExpertBiasBalancer, MoEConfig, MoELayer, apply_capacity


def top_p_by_entropy() -> None:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=64, ffn_dim=64, num_experts=16, router_type="top_p", top_p=0.4))
    x = torch.randn(4000, 64) * torch.logspace(-1.3, 0.7, 4000).unsqueeze(-1)
    with torch.no_grad():
        out = layer(x)
    probs = torch.softmax(out.routing.router_logits, -1)
    ent = -(probs * probs.log()).sum(-1)
    used = (out.routing.expert_ids >= 0).sum(-1).float()
    order = ent.argsort()
    print("1. top-p (p=0.4, 16 experts): experts per token by router-entropy quartile")
    print("| quartile | mean entropy (nats) | mean experts per token |")
    print("|---|---|---|")
    for q, idx in enumerate(order.chunk(4)):
        print(f"| Q{q + 1} | {ent[idx].mean():.2f} | {used[idx].mean():.2f} |")


def rts_vs_position() -> None:
    g = torch.Generator().manual_seed(0)
    num_t = 4000
    ids = torch.stack([torch.zeros(num_t, dtype=torch.long), torch.randint(1, 4, (num_t,), generator=g)], -1)
    w = torch.rand(num_t, 2, generator=g)
    print("\n2. capacity 1.0, expert 0 is every token's first choice (2x over capacity)")
    print("| drop policy | dropped share, first half of batch | dropped share, second half |")
    print("|---|---|---|")
    for policy in ("position", "random", "score"):
        kept, _ = apply_capacity(ids, w, 4, 1.0, 4, policy, torch.tensor(num_t), 2, generator=g)
        dropped = kept[:, 0] == -1
        print(
            f"| {policy} | {dropped[: num_t // 2].float().mean():.2f} | {dropped[num_t // 2 :].float().mean():.2f} |"
        )


def bias_balancing() -> None:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=32, ffn_dim=32, num_experts=8, top_k=2, use_expert_bias=True))
    x = torch.randn(2048, 32) + 1.0
    with torch.no_grad():
        layer.router.weight.normal_(std=0.3)
        layer.router.weight[0] = 0.05  # expert 0 favoured by every token
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.0)
    balancer = ExpertBiasBalancer(layer, rate=0.002)
    balancer.attach(opt)
    print("\n3. aux-loss-free bias updates (rate 2e-3), max/mean tokens per expert")
    print("| updates | max/mean load |")
    print("|---|---|")
    for step in range(301):
        with torch.no_grad():
            out = layer(x)
        load = out.routing.tokens_per_expert
        if step in (0, 25, 50, 100, 300):
            print(f"| {step} | {float(load.max() / load.mean()):.2f} |")
        balancer.observe([out.routing])
        opt.step()


if __name__ == "__main__":
    top_p_by_entropy()
    rts_vs_position()
    bias_balancing()
