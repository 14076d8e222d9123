"""Face-LLaVA in PyTorch, top to bottom.

The pieces, in the paper's words (Chaubey, Guan, Soleymani, WACV 2026) and the official code's key names:

- `LanguageBindTower`: the CLIP ViT-L/14 trunk of LanguageBind_Image / LanguageBind_Video_merge, cut after the
  layer the features come from (`mm_vision_select_layer = -2`). The video tower runs a temporal block over the
  8 frames before each layer's spatial block.
- `mm_projector`: `mlp2x_gelu`, Linear -> exact GELU -> Linear, into the LLM's embedding space.
- `LandmarkRegionProjector` (FRLP): one Linear per face region over the 68 iBUG points, plus a global Linear over
  all 136 values, added to every region token: 9 landmark tokens per image or frame.
- `FaceRegionCrossAttention` (FRGCA, `simple`, the released one) and `MaskedFaceRegionCrossAttention` (FRGCA,
  `masked`, the paper figure's variant): visual tokens attend to the 9 landmark tokens; the result is added back
  scaled by `branch_scale`.
- The LLM: transformers' `LlamaForCausalLM` (Vicuna-7B v1.5).

`FaceLlava` joins them and offers the public API the exporters and checks call: `from_pretrained`,
`encode_image`, `encode_video` (and `encode`, either one by the pixels' rank), `embed_prompt`,
`generate_reference`; training calls `forward_train`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from facellava import contract
from facellava.errors import FaceLlavaError

IGNORE_INDEX = -100  # labels the loss skips, as in the official code

# --- configuration ------------------------------------------------------------------------------------------


@dataclass
class TowerConfig:
    """The vision trunk of one LanguageBind tower (its `vision_config`), and how much of it the features use."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int  # layers the tower has
    num_used_layers: int  # layers up to the feature layer; the rest is never run
    patch_size: int = 14
    image_size: int = contract.IMAGE_SIZE
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    num_frames: int = 1
    add_time_attn: bool = False

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class FaceLlavaConfig:
    """The fields of a Face-LLaVA `config.json` that the model needs (LLaMA fields plus the multimodal ones)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    mm_projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int = 1024
    mm_vision_select_layer: int = -2
    mm_image_tower: str | None = None
    mm_video_tower: str | None = None
    landmarks_projector_type: str | None = None
    global_landmarks_projector_type: str | None = None
    cross_attn_type: str | None = None
    cross_attn_heads: int = 8  # hard-coded in the official code
    branch_scale: float = 0.1  # hard-coded in the official code; configurable here
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            hidden_act="silu",
            tie_word_embeddings=False,
        )

    @property
    def has_landmark_modules(self) -> bool:
        return self.landmarks_projector_type is not None


# --- the vision towers --------------------------------------------------------------------------------------

ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention over heads; q [M, N, D], k and v [M, L, D], bias broadcast to [M, H, N, L]."""
    m, n, d = q.shape
    head_dim = d // num_heads
    q = q.view(m, n, num_heads, head_dim).transpose(1, 2)
    k = k.view(m, -1, num_heads, head_dim).transpose(1, 2)
    v = v.view(m, -1, num_heads, head_dim).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
    if bias is not None:
        scores = scores + bias
    out = scores.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(m, n, d)


class TowerAttention(nn.Module):
    """CLIP self-attention: separate q/k/v/out projections with bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
        return self.out_proj(attended)


class TowerMLP(nn.Module):
    def __init__(self, config: TowerConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise FaceLlavaError(f"tower hidden_act {config.hidden_act!r} is not supported; "
                                 f"expected one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TowerLayer(nn.Module):
    """One encoder layer: for video, a temporal block over the frames first; then CLIP's pre-LN spatial block."""

    def __init__(self, config: TowerConfig):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = TowerAttention(dim, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = TowerMLP(config)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.num_frames = config.num_frames if config.add_time_attn else 1
        if config.add_time_attn:
            self.temporal_embedding = nn.Parameter(torch.zeros(1, config.num_frames, dim))
            self.temporal_attn = TowerAttention(dim, config.num_attention_heads)
            self.temporal_layer_norm1 = nn.LayerNorm(dim, eps=eps)

    def temporal_block(self, x: torch.Tensor) -> torch.Tensor:
        """x [(B*T), N, D] with frames innermost: add the temporal embedding, then self-attention over T."""
        bt, n, d = x.shape
        t = self.num_frames
        x = x.view(bt // t, t, n, d) + self.temporal_embedding.view(1, t, 1, d)
        # every token position attends over the frames: (b, t, n, d) -> (b*n, t, d)
        over_time = x.transpose(1, 2).reshape(-1, t, d)
        attended = self.temporal_attn(self.temporal_layer_norm1(over_time))
        x = x + attended.view(bt // t, n, t, d).transpose(1, 2)
        return x.reshape(bt, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_frames > 1:
            x = self.temporal_block(x)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class PatchEmbeddings(nn.Module):
    """CLIP's vision embeddings: 14x14 patches, a class token, learned positions."""

    def __init__(self, config: TowerConfig):
        super().__init__()
        dim = config.hidden_size
        self.patch_embedding = nn.Conv2d(3, dim, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.position_embedding = nn.Embedding(config.num_positions, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, 256, D]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class TowerEncoder(nn.Module):
    def __init__(self, config: TowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(TowerLayer(config) for _ in range(config.num_used_layers))


class LanguageBindTower(nn.Module):
    """A LanguageBind vision trunk. Returns the hidden states of the feature layer, CLS included.

    Images [B, 3, 224, 224] give [B, 257, C]; videos [B, 3, T, 224, 224] (C, T, H, W as the official processor
    makes them) give [B, T, 257, C]. Patch dropout is the identity at inference and is left out; so are the
    layers after the feature layer and `post_layernorm`, which the features never see.
    """

    def __init__(self, config: TowerConfig):
        super().__init__()
        self.config = config
        self.embeddings = PatchEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # CLIP's spelling
        self.encoder = TowerEncoder(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        is_video = pixel_values.dim() == 5
        if is_video:
            b, c, t, h, w = pixel_values.shape
            if t != self.config.num_frames:
                raise FaceLlavaError(f"the video tower takes exactly {self.config.num_frames} frames, got {t}")
            pixel_values = pixel_values.transpose(1, 2).reshape(b * t, c, h, w)  # frames innermost
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            x = layer(x)
        return x.view(b, t, *x.shape[1:]) if is_video else x


# --- projectors ---------------------------------------------------------------------------------------------


def build_mm_projector(projector_type: str, in_dim: int, out_dim: int) -> nn.Module:
    """`mlpNx_gelu` (the released one is `mlp2x_gelu`) or `linear`, with the official state-dict indices."""
    if projector_type == "linear":
        return nn.Linear(in_dim, out_dim)
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if not match:
        raise FaceLlavaError(f"mm_projector_type {projector_type!r} is not supported; expected 'mlp2x_gelu'")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, int(match.group(1))):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class LandmarkRegionProjector(nn.Module):
    """FRLP's local part: one Linear(2 * n_r -> D) per face region, no activation.

    Takes landmarks [..., 68, 2] (crop pixels / 256); returns one token per region, [..., 9, D].
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.region_layers = nn.ModuleDict({
            name: nn.Linear(2 * (stop - start), hidden_size) for name, start, stop in contract.LANDMARK_REGIONS
        })

    def forward(self, landmarks: torch.Tensor) -> torch.Tensor:
        tokens = [self.region_layers[name](landmarks[..., start:stop, :].flatten(-2))
                  for name, start, stop in contract.LANDMARK_REGIONS]
        return torch.stack(tokens, dim=-2)


# --- face-region guided cross-attention ---------------------------------------------------------------------


class PackedAttention(nn.Module):
    """`nn.MultiheadAttention`'s parameters (packed in_proj with bias, out_proj), queries attending to keys."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(queries, w_q, b_q), F.linear(keys, w_k, b_k), F.linear(keys, w_v, b_v)
        return self.out_proj(multi_head_attention(q, k, v, self.num_heads))


class RegionAttentionBlock(nn.Module):
    """`cross_attn` of the simple FRGCA: y = LayerNorm(h_v + MHA(q = h_v, k = v = h_l))."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attn = PackedAttention(dim, num_heads)
        self.ln = nn.LayerNorm(dim)

    def forward(self, visual: torch.Tensor, landmark_tokens: torch.Tensor) -> torch.Tensor:
        return self.ln(visual + self.attn(visual, landmark_tokens))


class FaceRegionCrossAttention(nn.Module):
    """FRGCA as released (`cross_attn_type: simple`): out = branch_scale * Linear(cross_attn(h_v, h_l)) + h_v.

    Per image or frame; no temporal mixing. `ln` is in the official state dict but unused in its forward.
    """

    def __init__(self, dim: int, num_heads: int, branch_scale: float):
        super().__init__()
        self.cross_attn = RegionAttentionBlock(dim, num_heads)
        self.linear_proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)  # unused, kept so that loading stays strict
        self.branch_scale = branch_scale

    def forward(self, visual: torch.Tensor, landmark_tokens: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """visual [M, N, D], landmark_tokens [M, 9, D]; `landmarks` is unused by this variant."""
        return self.branch_scale * self.linear_proj(self.cross_attn(visual, landmark_tokens)) + visual


def region_centroids(landmarks: torch.Tensor) -> torch.Tensor:
    """Mean point of each FRLP region: [..., 68, 2] -> [..., 9, 2]."""
    return torch.stack([landmarks[..., start:stop, :].mean(dim=-2) for _, start, stop in contract.LANDMARK_REGIONS],
                       dim=-2)


def patch_centres(num_tokens: int) -> torch.Tensor:
    """Centres of the 16x16 patches in [0, 1] as the official masked FRGCA lays them out, [num_tokens, 2].

    The official grid comes from `meshgrid(..., indexing="ij")`, so the first coordinate runs down the rows
    while landmarks are (x, y): an x/y transpose that the released weights (if any) were trained with, so it
    is kept. For 257 tokens a (0, 0) row stands for CLS; 256-token image features (which crash the official
    code) use the grid alone.
    """
    g = contract.PATCH_GRID
    line = torch.linspace(0.5 / g, 1 - 0.5 / g, g)
    rows, cols = torch.meshgrid(line, line, indexing="ij")
    grid = torch.stack([rows, cols], dim=-1).view(-1, 2)
    if num_tokens == g * g + 1:
        grid = torch.cat([torch.zeros(1, 2), grid])
    elif num_tokens != g * g:
        raise ValueError(f"masked FRGCA needs 256 or 257 visual tokens, got {num_tokens}")
    return grid


class MaskedAttentionBlock(nn.Module):
    """`cross_attn` of the masked FRGCA: separate q/k/v, no out projection, a soft proximity bias on the scores."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)

    def forward(self, visual: torch.Tensor, landmark_tokens: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attended = multi_head_attention(self.q_proj(visual), self.k_proj(landmark_tokens),
                                        self.v_proj(landmark_tokens), self.num_heads, bias=bias.unsqueeze(1))
        return self.ln(visual + attended)


class MaskedFaceRegionCrossAttention(nn.Module):
    """FRGCA with the Face-Region Patch Proximity Mask (`cross_attn_type: masked`).

    bias[n, r] = softmax_r(-|| patch_centre[n] - region_centroid[r] ||), zero distance (a uniform 1/9) for CLS;
    added to the attention scores; then out = branch_scale * Linear(...) + h_v as in the simple form.
    """

    def __init__(self, dim: int, num_heads: int, branch_scale: float):
        super().__init__()
        self.cross_attn = MaskedAttentionBlock(dim, num_heads)
        self.linear_proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)  # unused, kept so that loading stays strict
        self.branch_scale = branch_scale

    @staticmethod
    def proximity_bias(landmarks: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """landmarks [M, 68, 2] -> soft bias [M, num_tokens, 9]."""
        centres = patch_centres(num_tokens).to(landmarks)
        distances = torch.linalg.vector_norm(centres[None, :, None, :] - region_centroids(landmarks)[:, None],
                                             dim=-1)
        if num_tokens == contract.VIDEO_FRAME_TOKENS:
            distances = torch.cat([torch.zeros_like(distances[:, :1]), distances[:, 1:]], dim=1)
        return torch.softmax(-distances, dim=-1)

    def forward(self, visual: torch.Tensor, landmark_tokens: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """visual [M, N, D], landmark_tokens [M, 9, D], landmarks [M, 68, 2]."""
        bias = self.proximity_bias(landmarks, visual.shape[1])
        return self.branch_scale * self.linear_proj(self.cross_attn(visual, landmark_tokens, bias)) + visual


CROSS_ATTENTION_TYPES: dict[str, type[nn.Module]] = {
    "simple": FaceRegionCrossAttention,
    "masked": MaskedFaceRegionCrossAttention,
}


# --- the whole model ----------------------------------------------------------------------------------------


@dataclass
class ReferenceOutput:
    """What `generate_reference` returns: the greedy tokens, the logits that chose each one, and the text."""

    tokens: list[int]
    logits: torch.Tensor  # [len(tokens), vocab], float32; row 0 is the first-token logits
    text: str | None


class FaceLlava(nn.Module):
    """Face-LLaVA: towers + mm projector + FRLP + FRGCA in front of a LLaMA decoder."""

    def __init__(self, config: FaceLlavaConfig, image_tower: TowerConfig | None = None,
                 video_tower: TowerConfig | None = None):
        super().__init__()
        self.config = config
        self.llm = LlamaForCausalLM(config.llama_config())
        self.image_tower = LanguageBindTower(image_tower) if image_tower else None
        self.video_tower = LanguageBindTower(video_tower) if video_tower else None
        self.mm_projector = build_mm_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
        self.landmarks_projector: LandmarkRegionProjector | None = None
        self.global_landmarks_projector: nn.Linear | None = None
        self.landmarks_cross_attn: nn.Module | None = None
        if config.has_landmark_modules:
            self.landmarks_projector = LandmarkRegionProjector(config.hidden_size)
            self.global_landmarks_projector = nn.Linear(contract.LANDMARK_VALUES, config.hidden_size)
            cross_attention = CROSS_ATTENTION_TYPES[config.cross_attn_type or "simple"]
            self.landmarks_cross_attn = cross_attention(config.hidden_size, config.cross_attn_heads,
                                                        config.branch_scale)
        self.tokenizer: Any = None  # a sentencepiece.SentencePieceProcessor when the checkpoint has one
        self.missing_towers: dict[str, str] = {}  # kind -> where the loader looked for it (`no_tower`)
        self.tower_sources: dict[str, str] = {}  # kind -> where the loader found it

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, image_tower: str | Path | None = None,
                        video_tower: str | Path | None = None, dtype: torch.dtype = torch.float32,
                        branch_scale: float | None = None) -> FaceLlava:
        """Load a checkpoint in the official layout; see `facellava.model.loading.load_face_llava`."""
        from facellava.model.loading import load_face_llava

        return load_face_llava(checkpoint_dir, image_tower=image_tower, video_tower=video_tower, dtype=dtype,
                               branch_scale=branch_scale)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype

    # -- vision ----------------------------------------------------------------------------------------------

    def landmark_tokens(self, landmarks: torch.Tensor) -> torch.Tensor:
        """FRLP: landmarks [..., 68, 2] -> [..., 9, D], each region token plus the global token."""
        assert self.landmarks_projector is not None and self.global_landmarks_projector is not None
        global_token = self.global_landmarks_projector(landmarks.flatten(-2))
        return self.landmarks_projector(landmarks) + global_token.unsqueeze(-2)

    def fuse_landmarks(self, visual: torch.Tensor, landmarks: torch.Tensor | None) -> torch.Tensor:
        """FRLP + FRGCA on projected visual tokens [..., N, D]; without landmarks the tokens pass unchanged."""
        if landmarks is None:
            return visual
        if self.landmarks_cross_attn is None:
            raise FaceLlavaError("this checkpoint has no landmark modules (no landmarks_projector_type in its "
                                 "config.json); run it without landmarks")
        if tuple(landmarks.shape[-2:]) != (contract.NUM_LANDMARKS, 2):
            raise FaceLlavaError(f"landmarks must end in ({contract.NUM_LANDMARKS}, 2), got {tuple(landmarks.shape)}")
        lead, (n, d) = visual.shape[:-2], visual.shape[-2:]
        landmarks = landmarks.to(visual.dtype)
        tokens = self.landmark_tokens(landmarks).reshape(-1, len(contract.LANDMARK_REGIONS), d)
        fused = self.landmarks_cross_attn(visual.reshape(-1, n, d), tokens,
                                          landmarks.reshape(-1, contract.NUM_LANDMARKS, 2))
        return fused.view(*lead, n, d)

    def encode_image(self, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens of face crops: pixel_values [B, 3, 224, 224], landmarks [B, 68, 2] or None -> [B, 256, D].

        Raises FaceLlavaError when the checkpoint has no image tower or no landmark modules for given landmarks.
        """
        return self.project_visual(self.image_features(pixel_values), landmarks)

    def encode_video(self, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens of face videos: pixel_values [B, 3, 8, 224, 224], landmarks [B, 8, 68, 2] or None ->
        [B, 8, 257, D] (CLS kept). Raises FaceLlavaError when the checkpoint has no video tower."""
        return self.project_visual(self.video_features(pixel_values), landmarks)

    def encode(self, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens of an image batch [B, 3, 224, 224] (`encode_image`: [B, 256, D]) or a video batch
        [B, 3, 8, 224, 224] (`encode_video`: [B, 8, 257, D]), told apart by the pixels' rank; landmarks
        [B, 68, 2] / [B, 8, 68, 2] or None. Raises FaceLlavaError as those do; ValueError for another rank."""
        return self.project_visual(self.visual_features(pixel_values), landmarks)

    def visual_blocks(self, pixel_values: torch.Tensor, landmarks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The visual blocks of one medium (batch 1), as `embed_prompt` takes them: one [256, D] block for an
        image, eight [257, D] for a video."""
        tokens = self.encode(pixel_values, landmarks)
        if len(tokens) != 1:
            raise ValueError(f"visual_blocks takes one medium (batch 1), got a batch of {len(tokens)}")
        return list(tokens[0].reshape(-1, *tokens.shape[-2:]))

    def visual_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower features of an image batch (`image_features`) or a video batch (`video_features`), told
        apart by the pixels' rank (4 or 5). Raises ValueError for another rank."""
        if pixel_values.ndim == 4:
            return self.image_features(pixel_values)
        if pixel_values.ndim == 5:
            return self.video_features(pixel_values)
        raise ValueError(f"pixel_values must be an image batch [B, 3, 224, 224] or a video batch "
                         f"[B, 3, 8, 224, 224], got {list(pixel_values.shape)}")

    def no_tower(self, kind: str) -> str:
        """The one-line error for a tower this model lacks: where the loader looked, and what to pass."""
        return self.missing_towers.get(kind) or (f"this model has no {kind} tower; pass --{kind}-tower DIR "
                                                 f"({kind}_tower=DIR to from_pretrained), a LanguageBind directory")

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower's features [B, 256, C] (CLS dropped), before the projector."""
        if self.image_tower is None:
            raise FaceLlavaError(self.no_tower("image"))
        return self.image_tower(pixel_values.to(self.dtype))[:, 1:]

    def video_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The video tower's features [B, 8, 257, C] (CLS kept), before the projector."""
        if self.video_tower is None:
            raise FaceLlavaError(self.no_tower("video"))
        return self.video_tower(pixel_values.to(self.dtype))

    def project_visual(self, features: torch.Tensor, landmarks: torch.Tensor | None) -> torch.Tensor:
        """Tower features [..., N, C] to visual tokens [..., N, D]: mm projector, then FRLP + FRGCA."""
        return self.fuse_landmarks(self.mm_projector(features), landmarks)

    # -- language --------------------------------------------------------------------------------------------

    def prompt_ids(self, question: str, modality: contract.Modality = "image") -> list[int]:
        """The `llava_v1` prompt for a question, tokenized chunk by chunk; visual blocks as IMAGE_TOKEN_INDEX.
        The question is text: an `<image>` in it is tokenized as written, never made a visual slot."""
        if self.tokenizer is None:
            raise FaceLlavaError("this checkpoint has no tokenizer.model")
        return contract.tokenize_chunks(contract.prompt_chunks(question, modality), self.tokenizer.encode,
                                        self.config.bos_token_id)

    def embed_prompt(self, input_ids: Sequence[int], visual_blocks: torch.Tensor | Sequence[torch.Tensor] = ()
                     ) -> torch.Tensor:
        """The LLM's input embeddings [L, D]: text ids embedded, each IMAGE_TOKEN_INDEX replaced by the next block.

        `visual_blocks` is a sequence of [N, D] tensors (or one [K, N, D] tensor): `encode_image(...)[0]` is one
        block, `encode_video(...)[0]` is eight. The runs follow `contract.splice_plan`, as the runtime's do.
        Raises ValueError when their count differs from the markers'.
        """
        blocks = list(visual_blocks)
        embed = self.llm.get_input_embeddings()
        pieces = []
        for run in contract.splice_plan(input_ids, len(blocks)):
            if run.block is None:
                pieces.append(embed(torch.tensor(run.ids, dtype=torch.long, device=embed.weight.device)))
            else:
                pieces.append(blocks[run.block].to(embed.weight.dtype))
        return torch.cat(pieces)

    @torch.no_grad()
    def generate_reference(self, input_ids: Sequence[int], visual_blocks: torch.Tensor | Sequence[torch.Tensor] = (),
                           max_new_tokens: int = 32, stop_at_eos: bool = True) -> ReferenceOutput:
        """Greedy decoding from the spliced embeddings: the reference every exported variant is checked against.

        Takes the prompt ids with IMAGE_TOKEN_INDEX markers (from `prompt_ids`), the visual blocks in order (as
        for `embed_prompt`), how many tokens to generate, and whether to stop after EOS (EOS is included in the
        tokens). Positions are plain 1-D, one per embedding. Returns the tokens, the float32 logits each token was
        chosen from (row 0: the first-token logits), and the decoded text when a tokenizer is loaded.
        """
        embeds = self.embed_prompt(input_ids, visual_blocks)
        output = self.llm(inputs_embeds=embeds[None], use_cache=True)
        tokens, step_logits = [], []
        for _ in range(max_new_tokens):
            logits = output.logits[0, -1].float()
            step_logits.append(logits)
            token = int(logits.argmax())
            tokens.append(token)
            if stop_at_eos and token == self.config.eos_token_id:
                break
            output = self.llm(input_ids=torch.tensor([[token]]), past_key_values=output.past_key_values,
                              use_cache=True)
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode([t for t in tokens if t != self.config.eos_token_id])
        vocab = self.config.vocab_size
        logits = torch.stack(step_logits) if step_logits else torch.empty(0, vocab)
        return ReferenceOutput(tokens=tokens, logits=logits, text=text)

    # -- training --------------------------------------------------------------------------------------------

    def forward_train(self, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                      visual_blocks: Sequence[Sequence[torch.Tensor]], max_length: int | None = None
                      ) -> torch.Tensor:
        """The causal-LM loss of a batch, averaged over its supervised tokens, as the official trainer takes it.

        Per sample: the token ids with IMAGE_TOKEN_INDEX markers, labels as long as the ids (IGNORE_INDEX where
        nothing is learned), and the visual blocks in order (as for `embed_prompt`). Each block's positions get
        IGNORE_INDEX; each spliced sequence is cut to `max_length` and padded on the right. No attention mask is
        needed: with causal attention and padding on the right, no real position ever sees a padded one. Raises
        ValueError when no label is left to learn from.
        """
        sequences, targets = [], []
        for ids, sample_labels, blocks in zip(input_ids, labels, visual_blocks, strict=True):
            embeds = self.embed_prompt(ids, blocks)
            target = spliced_labels(ids, sample_labels, [len(block) for block in blocks])
            sequences.append(embeds[:max_length])
            targets.append(target[:max_length])
        length = max(len(sequence) for sequence in sequences)
        device = sequences[0].device
        batch = torch.zeros(len(sequences), length, sequences[0].shape[-1], dtype=sequences[0].dtype, device=device)
        target_ids = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long, device=device)
        for row, (sequence, target) in enumerate(zip(sequences, targets, strict=True)):
            batch[row, :len(sequence)] = sequence
            target_ids[row, :len(target)] = torch.tensor(target, dtype=torch.long)
        # position t predicts token t + 1
        shifted = target_ids[:, 1:]
        if not (shifted != IGNORE_INDEX).any():
            raise ValueError("no supervised tokens in this batch")
        positions = torch.arange(length, device=device).expand(len(sequences), -1)
        logits = self.llm(inputs_embeds=batch, position_ids=positions, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX)


def spliced_labels(input_ids: Sequence[int], labels: Sequence[int], block_lengths: Sequence[int]) -> list[int]:
    """Labels for the spliced sequence: each IMAGE_TOKEN_INDEX label becomes `block_lengths[i]` IGNORE_INDEX
    entries (nothing is learned at visual positions), the text labels stay as they are."""
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} token ids but {len(labels)} labels")
    spliced, cursor = [], 0
    for run in contract.splice_plan(input_ids, len(block_lengths)):
        if run.block is None:
            spliced.extend(labels[cursor:cursor + len(run.ids)])
            cursor += len(run.ids)
        else:
            spliced.extend([IGNORE_INDEX] * block_lengths[run.block])
            cursor += 1
    return spliced
