"""The Mamba (selective state-space) token mixer as Jamba uses it, and three ways to run its scan.

Shape legend: B = batch, S = new tokens in this call, D = model width, I = inner width
(``expand * D``), N = SSM state size, R = rank of the time-step projection, K = conv kernel width,
L = tokens in one chunk of the chunked scan (t and s index tokens inside a chunk).

The recurrence, per channel i and state n (h starts at zero)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        y_t = C_t . h_t + D * x_t

with input-dependent ``dt_t`` [I], ``B_t``/``C_t`` [N] and a fixed negative ``A`` [I, N]. It runs as:

* :func:`scan_sequential`: the obvious loop over time, the reference the others are tested
  against (float64, forward and gradients, ``tests/test_ssm.py``);
* :func:`scan_chunked`: for training and prefill. Inside a chunk of L tokens every state is a
  weighted sum of the chunk's inputs, ``h_t = exp(a_{1..t}) h_0 + sum_{s<=t} exp(a_{s+1..t}) u_s``
  with log-decays ``a = dt * A``, computed for all L tokens at once (cumulative sums, or segment
  sums when the decays are too steep for them); only the last state is carried to the next
  chunk. The Python loop runs S / L times instead of S times; on CPU, where each operator call
  costs microseconds, that is what the sequential loop spends most of its time on at small
  widths (``benchmarks/bench_ssm.py``, docs/ssm.md);
* :func:`scan_step`: one token given the state, what decoding with a cache runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.blocks.cache import KVCache, MambaState
from moekit.blocks.norm import RMSNorm
from moekit.config import JsonConfig, check_choice

SSM_ACTIVATIONS = ("silu", "gelu")
SCANS = ("auto", "chunked", "sequential", "step")


@dataclass(kw_only=True)
class MambaConfig(JsonConfig):
    """A Mamba mixer (:class:`MambaMixer`), named as Jamba's ``mamba_*`` options.

    Attributes:
        dim: model width D.
        expand: inner width I = ``expand * dim`` (Jamba ``mamba_expand``).
        state_dim: N, the SSM state size per channel (``mamba_d_state``).
        conv_kernel: K, the width of the depthwise causal conv (``mamba_d_conv``).
        dt_rank: R, the rank of the time-step projection; None means ``ceil(dim / 16)``
            (``mamba_dt_rank="auto"``).
        conv_bias: the conv has a bias (``mamba_conv_bias``).
        proj_bias: ``in_proj`` and ``out_proj`` have biases (``mamba_proj_bias``).
        dt_bc_norm: RMSNorms on dt, B and C before use (Jamba's; plain Mamba has none).
        norm_eps: epsilon of those norms.
        activation: after the conv, ``"silu"`` or ``"gelu"`` (the output gate is always SiLU).
        chunk_size: L, the most tokens per chunk of :func:`scan_chunked` (8 was fastest on CPU:
            longer chunks leave the cache, ``benchmarks/bench_ssm.py``).
    """

    dim: int
    expand: int = 2
    state_dim: int = 16
    conv_kernel: int = 4
    dt_rank: int | None = None
    conv_bias: bool = True
    proj_bias: bool = False
    dt_bc_norm: bool = False
    norm_eps: float = 1e-6
    activation: str = "silu"
    chunk_size: int = 8

    def __post_init__(self) -> None:
        for name in ("dim", "expand", "state_dim", "conv_kernel", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MambaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dt_rank is not None and self.dt_rank <= 0:
            raise ValueError(
                f"MambaConfig.dt_rank must be positive or None (ceil(dim / 16)), got {self.dt_rank}"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"MambaConfig.norm_eps must be positive, got {self.norm_eps}")
        check_choice("MambaConfig", "activation", self.activation, SSM_ACTIVATIONS)

    @property
    def inner_dim(self) -> int:
        """I = ``expand * dim``."""
        return self.expand * self.dim

    @property
    def time_step_rank(self) -> int:
        """R: ``dt_rank`` or ``ceil(dim / 16)``."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.dim / 16)


def scan_sequential(
    x_BSI: Tensor, dt_BSI: Tensor, A_IN: Tensor, B_BSN: Tensor, C_BSN: Tensor, h_BIN: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The selective scan as a loop over time (the reference).

    Args:
        x_BSI: inputs; dt_BSI: positive time steps; A_IN: negative state matrix (diagonal per
            channel); B_BSN, C_BSN: input and output projections; h_BIN: the state before the
            first token (None = zeros).

    Returns:
        ``(y_BSI, h_BIN)``: outputs without the ``D * x`` skip, and the state after the last token.
    """
    b, s, i = x_BSI.shape
    h = x_BSI.new_zeros(b, i, A_IN.shape[1]) if h_BIN is None else h_BIN
    ys = []
    for t in range(s):
        h = (
            torch.exp(dt_BSI[:, t, :, None] * A_IN) * h
            + (dt_BSI[:, t] * x_BSI[:, t])[..., None] * B_BSN[:, t, None]
        )
        ys.append((h * C_BSN[:, t, None]).sum(-1))
    return torch.stack(ys, 1), h


def scan_step(
    x_BI: Tensor, dt_BI: Tensor, A_IN: Tensor, B_BN: Tensor, C_BN: Tensor, h_BIN: Tensor
) -> tuple[Tensor, Tensor]:
    """One token of the selective scan given the state: ``(y_BI, new h_BIN)`` (decode)."""
    h_BIN = torch.exp(dt_BI[..., None] * A_IN) * h_BIN + (dt_BI * x_BI)[..., None] * B_BN[:, None]
    return torch.einsum("bin,bn->bi", h_BIN, C_BN), h_BIN


def _segment_sums(a_BLIN: Tensor) -> Tensor:
    """``seg[b, t, s] = sum_{s < r <= t} a_r`` for s <= t and -inf above the diagonal: ``[B, L, L, I, N]``.

    A cumulative sum of the decays masked to ``r > s`` (never a difference of running sums, whose
    large exponents would cancel).
    """
    length = a_BLIN.shape[1]
    idx = torch.arange(length, device=a_BLIN.device)
    after_rs = (idx[:, None] > idx[None, :])[None, :, :, None, None]  # r > s
    seg = torch.where(after_rs, a_BLIN[:, :, None], 0.0).cumsum(1)
    upper = (idx[:, None] < idx[None, :])[None, :, :, None, None]  # t < s: not reachable
    return seg.masked_fill(upper, float("-inf"))


# Largest total log-decay inside one chunk for the cumulative-sum form: exp(-total) must stay
# finite (float32 overflows at 88) with room for the inputs' and the gradients' own scale.
_CUMSUM_LIMIT = {torch.float32: 40.0, torch.float64: 400.0}


def cumsum_chunks(dt_BSI: Tensor, A_IN: Tensor, chunk_size: int) -> list[int]:
    """Chunk lengths (summing to S) for the cumulative-sum form of :func:`scan_chunked`.

    Greedy from the left: each chunk takes up to ``chunk_size`` tokens while its total log-decay
    ``sum_t dt_t * A`` stays within the dtype's exponent range, bounded per token by
    ``max_{b, i} dt_t * max_n |A|`` (one ``[S]`` read on the host). So a few steep tokens only
    shorten the chunks around them; a token too steep on its own gets a chunk of one.
    """
    limit = _CUMSUM_LIMIT.get(dt_BSI.dtype, 0.0)
    rate_S = (dt_BSI.detach() * A_IN.detach().abs().amax(1)).amax(dim=(0, 2))
    lengths, length, total = [], 0, 0.0
    for rate in rate_S.tolist():
        if length == chunk_size or (length and total + rate > limit):
            lengths.append(length)
            length, total = 0, 0.0
        length, total = length + 1, total + rate
    if length:
        lengths.append(length)
    return lengths


def scan_chunked(
    x_BSI: Tensor,
    dt_BSI: Tensor,
    A_IN: Tensor,
    B_BSN: Tensor,
    C_BSN: Tensor,
    h_BIN: Tensor | None = None,
    chunk_size: int = 8,
    form: str = "cumsum",
) -> tuple[Tensor, Tensor]:
    """The selective scan in chunks of up to L tokens (training and prefill); same contract as
    :func:`scan_sequential`.

    With ``a = dt * A`` and ``u = dt * x * B``, inside a chunk ``h_t = exp(a_{1..t}) * h_0 +
    sum_{s<=t} exp(a_{s+1..t}) * u_s``, and only each chunk's last state is carried to the next.
    Chunks run one after another so their ``[B, L, I, N]`` tensors stay in cache.

    ``form="cumsum"`` writes the sum as ``exp(c_t) * (h_0 + cumsum_s(exp(-c_s) * u_s))`` with ``c``
    the chunk's running log-decay: about ten tensor operations per chunk instead of eight per
    token. Its rounding error stays relative to ``|u|`` (each term is rescaled by ``exp(c_t - c_s)
    <= 1``), but ``exp(-c)`` must not overflow, so chunks end where their total decay would leave
    the dtype's range (:func:`cumsum_chunks`; one-token chunks use the recurrence itself).
    ``form="segsum"`` builds the ``[B, L, L, I, N]`` decays from segment sums instead, in fixed
    chunks of L: safe for any decay without the host read, at L times the arithmetic.
    """
    check_choice("scan_chunked", "form", form, ("cumsum", "segsum"))
    b, s, i = x_BSI.shape
    h = x_BSI.new_zeros(b, i, A_IN.shape[1]) if h_BIN is None else h_BIN
    if form == "cumsum":
        lengths = cumsum_chunks(dt_BSI, A_IN, chunk_size)
    else:
        lengths = [min(chunk_size, s - start) for start in range(0, s, chunk_size)]
    ys, start = [], 0
    for length in lengths:
        chunk = slice(start, start + length)
        start += length
        dt_BLI = dt_BSI[:, chunk]
        a_BLIN = dt_BLI[..., None] * A_IN
        u_BLIN = (dt_BLI * x_BSI[:, chunk])[..., None] * B_BSN[:, chunk, None]
        if form == "segsum":
            decay_BLLIN = torch.exp(_segment_sums(a_BLIN))
            from_h0_BLIN = torch.exp(a_BLIN.cumsum(1)) * h[:, None]
            h_BLIN = torch.einsum("btsin,bsin->btin", decay_BLLIN, u_BLIN) + from_h0_BLIN
        elif length == 1:
            h_BLIN = torch.exp(a_BLIN) * h[:, None] + u_BLIN
        else:
            c_BLIN = a_BLIN.cumsum(1)
            # exp(-c) rather than 1 / exp(c): the backward of a division would square the
            # decay and overflow.
            h_BLIN = torch.exp(c_BLIN) * (h[:, None] + torch.cumsum(torch.exp(-c_BLIN) * u_BLIN, 1))
        ys.append((h_BLIN @ C_BSN[:, chunk, :, None])[..., 0])
        h = h_BLIN[:, -1]
    return torch.cat(ys, 1), h


def scan_method(num_tokens: int, has_state: bool, requested: str = "auto") -> str:
    """Which scan :class:`MambaMixer` runs: ``requested``, or for ``"auto"`` the single-step update
    for one token with a state (decode) and the chunked scan otherwise."""
    check_choice("MambaMixer", "scan", requested, SCANS)
    if requested == "step" and num_tokens != 1:
        raise ValueError(f"MambaMixer: scan='step' takes one token per row, got {num_tokens}")
    if requested != "auto":
        return requested
    return "step" if num_tokens == 1 and has_state else "chunked"


class MambaMixer(nn.Module):
    """Jamba's Mamba mixer: ``[B, S, D] -> [B, S, D]``, with its recurrent state in a :class:`KVCache`.

    ``x, z = in_proj(x)``; ``x = act(conv1d(x))`` (depthwise, causal); ``dt, B, C = x_proj(x)``
    (each RMS-normed when ``dt_bc_norm``); ``dt = softplus(dt_proj(dt))``; ``y = scan(x, dt, A, B, C)
    + D * x`` with ``A = -exp(A_log)``; ``out_proj(y * silu(z))``. Padding positions are zeroed
    before ``in_proj`` and after the conv (as transformers' Jamba does), so with left padding they
    leave the state at zero.

    Parameters (Jamba's names): ``in_proj`` ``[2I, D]``, ``conv1d`` (weight ``[I, 1, K]``, bias
    ``[I]``), ``x_proj`` ``[R + 2N, I]``, ``dt_proj`` ``[I, R]`` + bias, ``A_log`` ``[I, N]``, ``D``
    ``[I]``, ``out_proj`` ``[D, I]``; ``dt_layernorm`` ``[R]``, ``b_layernorm``/``c_layernorm`` ``[N]``
    when ``dt_bc_norm``.

    Args:
        config: the :class:`MambaConfig`.
        layer_idx: this layer's slot in a shared :class:`KVCache`.
    """

    def __init__(self, config: MambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        inner, rank, n = config.inner_dim, config.time_step_rank, config.state_dim
        self.in_proj = nn.Linear(config.dim, 2 * inner, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(inner, inner, config.conv_kernel, groups=inner, bias=config.conv_bias)
        self.x_proj = nn.Linear(inner, rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, n))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, config.dim, bias=config.proj_bias)
        if config.dt_bc_norm:
            self.dt_layernorm = RMSNorm(rank, config.norm_eps)
            self.b_layernorm = RMSNorm(n, config.norm_eps)
            self.c_layernorm = RMSNorm(n, config.norm_eps)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's init of the SSM parameters: ``A = -(1..N)`` per channel, ``D = 1``, and a
        ``dt_proj`` bias whose softplus is log-uniform in ``[dt_min, dt_max]`` (so the initial time
        steps span short and long memories)."""
        n = self.config.state_dim
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)
        dt = torch.exp(
            torch.rand(self.config.inner_dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        )
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(
        self,
        x_BSD: Tensor,
        token_mask_BS: Tensor | None = None,
        cache: KVCache | None = None,
        scan: str = "auto",
    ) -> Tensor:
        """Mixes S new tokens, continuing from and updating this layer's state in ``cache``.

        Args:
            x_BSD: ``[B, S, D]`` normed hidden states.
            token_mask_BS: ``[B, S]`` (1/True = real token), or None when all are real.
            cache: read and write this layer's :class:`MambaState` (None: start from zeros, keep nothing).
            scan: ``"auto"`` (see :func:`scan_method`), ``"chunked"``, ``"sequential"`` or ``"step"``.

        Returns:
            ``[B, S, D]``.
        """
        state = cache.mamba_state(self.layer_idx) if cache is not None else None
        out_BSD, new_state = self.mix(x_BSD, token_mask_BS, state, scan)
        if cache is not None:
            cache.set_mamba_state(self.layer_idx, new_state, x_BSD.shape[1])
        return out_BSD

    def mix(
        self,
        x_BSD: Tensor,
        token_mask_BS: Tensor | None = None,
        state: MambaState | None = None,
        scan: str = "auto",
    ) -> tuple[Tensor, MambaState]:
        """The mixer as a function of its state: returns ``(out_BSD, state after the S tokens)``."""
        cfg = self.config
        b, s, _ = x_BSD.shape
        inner, kernel, n, rank = cfg.inner_dim, cfg.conv_kernel, cfg.state_dim, cfg.time_step_rank
        method = scan_method(s, state is not None, scan)
        mask_BS1 = None if token_mask_BS is None else token_mask_BS[..., None].to(x_BSD.dtype)
        if mask_BS1 is not None:
            x_BSD = x_BSD * mask_BS1
        x_BSI, z_BSI = self.in_proj(x_BSD).chunk(2, dim=-1)
        # The conv sees the previous K - 1 inputs (zeros at the start), so a continued call
        # computes what one long call would.
        x_BIS = x_BSI.transpose(1, 2)
        past_BIk = x_BIS.new_zeros(b, inner, kernel - 1) if state is None else state.conv_BIK[:, :, 1:]
        window_BIk = torch.cat([past_BIk, x_BIS], dim=-1)
        conv_BIS = F.conv1d(window_BIk, self.conv1d.weight, self.conv1d.bias, groups=inner)
        x_BSI = _activate(conv_BIS.transpose(1, 2), cfg.activation)
        if mask_BS1 is not None:
            x_BSI = x_BSI * mask_BS1
        dt_BSR, B_BSN, C_BSN = self.x_proj(x_BSI).split([rank, n, n], dim=-1)
        if cfg.dt_bc_norm:
            dt_BSR, B_BSN, C_BSN = self.dt_layernorm(dt_BSR), self.b_layernorm(B_BSN), self.c_layernorm(C_BSN)
        # The scan runs in float32 at least (as transformers does): exp of summed decays in
        # half precision loses the long memories.
        work = torch.promote_types(x_BSI.dtype, torch.float32)
        dt_BSI = F.softplus(self.dt_proj(dt_BSR).to(work))
        A_IN = -torch.exp(self.A_log.to(work))
        xs_BSI, B_BSN, C_BSN = x_BSI.to(work), B_BSN.to(work), C_BSN.to(work)
        h0_BIN = None if state is None else state.ssm_BIN.to(work)
        if method == "step":
            if h0_BIN is None:
                h0_BIN = xs_BSI.new_zeros(b, inner, n)
            y_BI, h_BIN = scan_step(xs_BSI[:, 0], dt_BSI[:, 0], A_IN, B_BSN[:, 0], C_BSN[:, 0], h0_BIN)
            y_BSI = y_BI[:, None]
        elif method == "sequential":
            y_BSI, h_BIN = scan_sequential(xs_BSI, dt_BSI, A_IN, B_BSN, C_BSN, h0_BIN)
        else:
            y_BSI, h_BIN = scan_chunked(xs_BSI, dt_BSI, A_IN, B_BSN, C_BSN, h0_BIN, cfg.chunk_size)
        y_BSI = y_BSI + xs_BSI * self.D.to(work)
        y_BSI = (y_BSI * F.silu(z_BSI.to(work))).to(x_BSD.dtype)
        new_state = MambaState(conv_BIK=window_BIk[:, :, -kernel:], ssm_BIN=h_BIN)
        return self.out_proj(y_BSI), new_state

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MambaState:
        """A zero state for ``batch`` rows (what a fresh sequence starts from)."""
        cfg = self.config
        work = torch.promote_types(dtype or self.A_log.dtype, torch.float32)
        return MambaState(
            conv_BIK=torch.zeros(batch, cfg.inner_dim, cfg.conv_kernel, device=device, dtype=dtype),
            ssm_BIN=torch.zeros(batch, cfg.inner_dim, cfg.state_dim, device=device, dtype=work),
        )


class BidirectionalMamba(nn.Module):
    """Vision Mamba's bidirectional mixer: one :class:`MambaMixer` scans the sequence forwards,
    a second (its own weights) scans it backwards, and the outputs are averaged.

    ``out = (forward(x) + flip(backward(flip(x)))) / 2`` with ``flip`` reversing the token axis,
    so every token sees the whole sequence (an encoder over patches has no causal order).
    Submodules: ``forward_mixer``, ``backward_mixer``. No cache: it is for encoders.
    """

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.forward_mixer = MambaMixer(config, layer_idx=0)
        self.backward_mixer = MambaMixer(config, layer_idx=0)

    def forward(self, x_BSD: Tensor, token_mask_BS: Tensor | None = None, scan: str = "auto") -> Tensor:
        """``[B, S, D] -> [B, S, D]``; ``token_mask_BS`` (1 = real) zeroes padding in both scans."""
        ahead_BSD, _ = self.forward_mixer.mix(x_BSD, token_mask_BS, None, scan)
        flip_mask = None if token_mask_BS is None else token_mask_BS.flip(1)
        back_BSD, _ = self.backward_mixer.mix(x_BSD.flip(1), flip_mask, None, scan)
        return 0.5 * (ahead_BSD + back_BSD.flip(1))


def _activate(x: Tensor, activation: str) -> Tensor:
    return F.silu(x) if activation == "silu" else F.gelu(x)
