"""Configs of the vision family: the shared transformer encoder, the ViT, the text tower and CLIP.

Every tower is an :class:`EncoderConfig` (width, depth, heads, FFN and the MoE placement rule the
decoder LM uses: ``all``, ``every_other`` (odd layers), ``first_half``, ``second_half``,
``explicit``, ``none``). :class:`ViTConfig` adds patches and heads, :class:`TextConfig` the
vocabulary and EOS pooling, :class:`CLIPConfig` pairs one of each with a projection and a learned
temperature. Field names follow moekit, not transformers; ``moekit.convert.families.clip`` maps them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.blocks.ssm import MambaConfig
from moekit.config import JsonConfig, check_choice
from moekit.layers import MoEConfig
from moekit.layers.config import ACTIVATIONS

MOE_PLACEMENTS = ("all", "every_other", "first_half", "second_half", "explicit", "none")
POOLINGS = ("eos", "argmax")
MIXERS = ("attention", "bimamba")


@dataclass(kw_only=True)
class EncoderConfig(JsonConfig):
    """A pre-norm transformer encoder: ``x + mixer(ln1(x))``, then ``h + ffn(ln2(h))``.

    Attributes:
        dim: width D.
        num_layers: L.
        num_heads: attention heads (divide D).
        ffn_dim: dense FFN width (also each expert's width unless ``moe.ffn_dim`` says otherwise).
        activation: FFN nonlinearity: ``"gelu"``, ``"quick_gelu"`` (OpenAI CLIP) or ``"swiglu"``.
        norm_eps: LayerNorm epsilon.
        moe: the MoE layer template (``dim`` must equal ``dim``), or None for a dense encoder.
        moe_placement: which layers are MoE (see the module doc); ``every_other`` = odd layers,
            as M3ViT and sparse upcycling's "every other".
        moe_layer_indices: the MoE layers for ``"explicit"``.
        experts_per_layer: experts of each MoE layer in order (task extraction leaves them
            unequal); None = ``moe.num_experts`` everywhere.
        initializer_range: std of the normal init.
        mixer: the token mixer of every layer: ``"attention"`` (bidirectional or causal
            self-attention) or ``"bimamba"`` (Vision Mamba: a forward and a backward
            :class:`~moekit.blocks.MambaMixer` scan, averaged; encoders without a causal mask only).
        mamba: the Mamba mixer of ``"bimamba"`` (required with it; ``mamba.dim`` must equal ``dim``).
    """

    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    activation: str = "gelu"
    norm_eps: float = 1e-5
    moe: MoEConfig | None = None
    moe_placement: str = "all"
    moe_layer_indices: tuple[int, ...] | None = None
    experts_per_layer: tuple[int, ...] | None = None
    initializer_range: float = 0.02
    mixer: str = "attention"
    mamba: MambaConfig | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_choice(name, "mixer", self.mixer, MIXERS)
        if (self.mixer == "bimamba") != (self.mamba is not None):
            raise ValueError(f"{name}.mamba is given exactly when mixer='bimamba' (mixer={self.mixer!r})")
        if self.mamba is not None and self.mamba.dim != self.dim:
            raise ValueError(f"{name}.mamba.dim={self.mamba.dim} must equal dim={self.dim}")
        for f in ("dim", "num_layers", "num_heads", "ffn_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{name}.{f} must be positive, got {getattr(self, f)}")
        if self.dim % self.num_heads:
            raise ValueError(f"{name}.num_heads={self.num_heads} must divide dim={self.dim}")
        check_choice(name, "activation", self.activation, ACTIVATIONS)
        check_choice(name, "moe_placement", self.moe_placement, MOE_PLACEMENTS)
        if self.norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError(f"{name}: norm_eps and initializer_range must be positive")
        if self.moe_layer_indices is not None:
            self.moe_layer_indices = tuple(self.moe_layer_indices)
            bad = [i for i in self.moe_layer_indices if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"{name}.moe_layer_indices {bad} are outside [0, {self.num_layers})")
        if (self.moe_placement == "explicit") != (self.moe_layer_indices is not None):
            raise ValueError(f"{name}.moe_layer_indices is given exactly when moe_placement='explicit'")
        if self.moe is not None and self.moe.dim != self.dim:
            raise ValueError(f"{name}.moe.dim={self.moe.dim} must equal dim={self.dim}")
        if self.experts_per_layer is not None:
            self.experts_per_layer = tuple(self.experts_per_layer)
            if len(self.experts_per_layer) != len(self.moe_layer_ids):
                raise ValueError(
                    f"{name}.experts_per_layer has {len(self.experts_per_layer)} counts for "
                    f"{len(self.moe_layer_ids)} MoE layers {self.moe_layer_ids}"
                )

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` has an MoE FFN (the decoder LM's placement names)."""
        if self.moe is None or self.moe_placement == "none":
            return False
        half = self.num_layers // 2
        return {
            "all": True,
            "every_other": i % 2 == 1,
            "first_half": i < half,
            "second_half": i >= half,
            "explicit": i in (self.moe_layer_indices or ()),
        }[self.moe_placement]

    @property
    def moe_layer_ids(self) -> list[int]:
        """The MoE layers, in order."""
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def moe_config(self, i: int) -> MoEConfig:
        """The MoE config of layer ``i`` (the template with this layer's expert count)."""
        assert self.moe is not None
        if self.experts_per_layer is None:
            return self.moe
        num_e = self.experts_per_layer[self.moe_layer_ids.index(i)]
        return self.moe.replace(num_experts=num_e, top_k=min(self.moe.top_k, num_e))


@dataclass(kw_only=True)
class ViTConfig(EncoderConfig):
    """A ViT: patch embedding, CLS token, learned positions, encoder, heads.

    Attributes:
        image_size: input height = width (pixels).
        patch_size: square patch side (divides ``image_size``).
        num_channels: input channels.
        patch_bias: the patch projection has a bias (ViT: yes; CLIP: no).
        pre_norm: a LayerNorm on the embeddings before the encoder (CLIP's ``pre_layrnorm``).
        num_classes: classes of the classification head on the pooled CLS token (0 = no head).
        task_num_classes: classes of each task's head (task-level MoE); empty = single task.
            With MoE layers and more than one task, ``moe.num_tasks`` must equal the task count.
        aux_loss_coef, z_loss_coef: recommended aux-loss weights (objectives take theirs from here).
    """

    image_size: int = 8
    patch_size: int = 2
    num_channels: int = 1
    patch_bias: bool = True
    pre_norm: bool = False
    num_classes: int = 0
    task_num_classes: tuple[int, ...] = ()
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("image_size", "patch_size", "num_channels"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ViTConfig.{f} must be positive, got {getattr(self, f)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.patch_size={self.patch_size} must divide image_size={self.image_size}"
            )
        if self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be >= 0, got {self.num_classes}")
        self.task_num_classes = tuple(self.task_num_classes)
        if any(c < 2 for c in self.task_num_classes):
            raise ValueError(
                f"ViTConfig.task_num_classes needs >= 2 classes per task, got {self.task_num_classes}"
            )
        if self.task_num_classes and self.num_classes:
            raise ValueError(
                "ViTConfig: give num_classes (one head) or task_num_classes (per-task heads), not both"
            )
        if self.moe is not None and self.moe_layer_ids:
            want = len(self.task_num_classes) if len(self.task_num_classes) > 1 else 0
            if self.moe.num_tasks not in (0, want) or (want and self.moe.num_tasks != want):
                raise ValueError(
                    f"ViTConfig.moe.num_tasks={self.moe.num_tasks} must equal the number of task heads "
                    f"({want}) for task-level routing"
                )

    @property
    def num_patches(self) -> int:
        """Patches per image: ``(image_size / patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tasks(self) -> int:
        """Tasks (1 for a plain classifier)."""
        return max(len(self.task_num_classes), 1)


@dataclass(kw_only=True)
class TextConfig(EncoderConfig):
    """CLIP's text tower: token and position embeddings, causal encoder, final norm, EOS pooling.

    Attributes:
        vocab_size: V.
        max_position_embeddings: the longest text.
        eos_token_id: the token whose first position is pooled (``pooling="eos"``).
        pooling: ``"eos"`` (first ``eos_token_id`` in each row) or ``"argmax"`` (the highest token
            id, what transformers does for old CLIP configs with ``eos_token_id == 2``).
        pad_token_id: the padding id (kept for export; padding is given by ``attention_mask``).
    """

    vocab_size: int = 64
    max_position_embeddings: int = 16
    eos_token_id: int = 1
    pooling: str = "eos"
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("TextConfig", "pooling", self.pooling, POOLINGS)
        if self.vocab_size <= 0 or self.max_position_embeddings <= 0:
            raise ValueError("TextConfig: vocab_size and max_position_embeddings must be positive")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"TextConfig.eos_token_id={self.eos_token_id} is outside [0, {self.vocab_size})")


def _default_vision() -> ViTConfig:
    return ViTConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, patch_bias=False, pre_norm=True)


def _default_text() -> TextConfig:
    return TextConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64)


@dataclass(kw_only=True)
class CLIPConfig(JsonConfig):
    """A CLIP dual encoder with optional MoE FFNs in either tower.

    Attributes:
        vision: the image tower (``num_classes`` 0; CLIP uses ``patch_bias=False, pre_norm=True``).
        text: the text tower.
        projection_dim: width of the shared embedding space.
        logit_scale_init: initial log temperature (CLIP: ln(1 / 0.07) = 2.6592).
        aux_loss_coef, z_loss_coef: recommended aux-loss weights.
    """

    vision: ViTConfig = field(default_factory=_default_vision)
    text: TextConfig = field(default_factory=_default_text)
    projection_dim: int = 32
    logit_scale_init: float = 2.6592
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.projection_dim <= 0:
            raise ValueError(f"CLIPConfig.projection_dim must be positive, got {self.projection_dim}")
        if self.vision.num_classes or self.vision.task_num_classes:
            raise ValueError("CLIPConfig.vision must have no classification head (num_classes=0)")
