"""The PyTorch Face-LLaVA against independent computations: transformers' CLIP, nn.MultiheadAttention, the
FRLP/FRGCA formulas written out, and the LLM's own uncached forward."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from facellava import contract
from facellava.model import FaceLlava
from facellava.model.checkpoint import CheckpointWeights

torch.manual_seed(1234)


def pixels(batch: int, video: bool = False) -> torch.Tensor:
    shape = (batch, 3, 8, 224, 224) if video else (batch, 3, 224, 224)
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


def face_landmarks(*lead: int) -> torch.Tensor:
    """Plausible landmarks in [0, 1] (crop pixels / 256)."""
    return 0.2 + 0.6 * torch.rand(*lead, 68, 2, generator=torch.Generator().manual_seed(11))


def clip_reference(tower_dir, select_layer: int = -2) -> CLIPVisionModel:
    vision = json.loads((tower_dir / "config.json").read_text())["vision_config"]
    config = CLIPVisionConfig(
        hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
        num_attention_heads=vision["num_attention_heads"], num_hidden_layers=vision["num_hidden_layers"],
        patch_size=vision["patch_size"], image_size=vision["image_size"], hidden_act=vision["hidden_act"],
        layer_norm_eps=vision["layer_norm_eps"], attn_implementation="eager")
    model = CLIPVisionModel(config).eval()
    weights = CheckpointWeights.open(tower_dir)
    state = {k: weights.get(k) for k in weights.keys() if k.startswith("vision_model.")}
    if not any(k.startswith("vision_model.") for k in model.state_dict()):  # transformers 5 drops the prefix
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


@torch.no_grad()
def test_image_tower_matches_transformers_clip(tiny_model, tiny_checkpoint):
    reference = clip_reference(tiny_checkpoint / "LanguageBind_Image")
    x = pixels(2)
    expected = reference(pixel_values=x, output_hidden_states=True).hidden_states[-2]  # layer 23 of 24 in ViT-L
    ours = tiny_model.image_tower(x)
    assert ours.shape == (2, 257, 128)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # encode_image drops CLS and projects: Linear -> exact GELU -> Linear, written out
    p = tiny_model.mm_projector
    projected = F.linear(F.gelu(F.linear(expected[:, 1:], p[0].weight, p[0].bias)), p[2].weight, p[2].bias)
    torch.testing.assert_close(tiny_model.encode_image(x), projected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_video_tower_layer_matches_a_direct_computation(tiny_model):
    tower = tiny_model.video_tower
    layer = tower.encoder.layers[0]
    b, t, n, d = 2, 8, 257, 128
    x = torch.randn(b * t, n, d, generator=torch.Generator().manual_seed(3))

    # temporal block, token by token: add the frame's temporal embedding, LayerNorm, attention over the 8 frames
    heads, hd = 2, d // 2
    a = layer.temporal_attn
    expected = x.clone().view(b, t, n, d) + layer.temporal_embedding.view(1, t, 1, d)
    with_time = expected.clone()
    for bi in range(b):
        for token in (0, 1, 128, 256):  # CLS and a few patches
            seq = layer.temporal_layer_norm1(with_time[bi, :, token])  # [T, D]
            q, k, v = a.q_proj(seq), a.k_proj(seq), a.v_proj(seq)
            outs = []
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                weights = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd), dim=-1)
                outs.append(weights @ v[:, sl])
            expected[bi, :, token] = with_time[bi, :, token] + a.out_proj(torch.cat(outs, dim=-1))
    ours_temporal = layer.temporal_block(x).view(b, t, n, d)
    for token in (0, 1, 128, 256):
        torch.testing.assert_close(ours_temporal[:, :, token], expected[:, :, token], rtol=1e-5, atol=1e-5)

    # spatial block: transformers' CLIPEncoderLayer with the same weights, run on every frame
    config = CLIPVisionConfig(hidden_size=d, intermediate_size=256, num_attention_heads=heads, hidden_act="gelu",
                              layer_norm_eps=1e-5, attn_implementation="eager")
    clip_layer = CLIPEncoderLayer(config).eval()
    own = {k: v for k, v in layer.state_dict().items() if not k.startswith("temporal")}
    clip_layer.load_state_dict(own, strict=True)
    spatial = clip_layer(ours_temporal.reshape(b * t, n, d), None)
    spatial = spatial[0] if isinstance(spatial, tuple) else spatial
    torch.testing.assert_close(layer(x), spatial, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_frlp_is_the_sum_of_region_and_global_linears(tiny_model):
    lm = face_landmarks(3)
    tokens = tiny_model.landmark_tokens(lm)
    assert tokens.shape == (3, 9, 256)
    z = lm.reshape(3, 136)  # interleaved x0, y0, x1, y1, ...
    g = tiny_model.global_landmarks_projector
    for r, (name, start, stop) in enumerate(contract.LANDMARK_REGIONS):
        layer = tiny_model.landmarks_projector.region_layers[name]
        expected = z[:, 2 * start:2 * stop] @ layer.weight.T + layer.bias + z @ g.weight.T + g.bias
        torch.testing.assert_close(tokens[:, r], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_simple_frgca_matches_nn_multihead_attention(tiny_model):
    frgca = tiny_model.landmarks_cross_attn
    d = 256
    mha = torch.nn.MultiheadAttention(d, 8, batch_first=True).eval()
    mha.load_state_dict(frgca.cross_attn.attn.state_dict())  # the official module's exact parameters
    visual = torch.randn(2, 256, d, generator=torch.Generator().manual_seed(5))
    lm = face_landmarks(2)
    tokens = tiny_model.landmark_tokens(lm)
    attended, _ = mha(visual, tokens, tokens)
    y = frgca.cross_attn.ln(visual + attended)
    expected = 0.1 * frgca.linear_proj(y) + visual
    torch.testing.assert_close(frgca(visual, tokens, lm), expected, rtol=1e-5, atol=1e-5)
    # the whole image path: tower -> projector -> FRLP -> FRGCA
    x = pixels(2)
    plain = tiny_model.encode_image(x)
    fused = tiny_model.encode_image(x, lm)
    torch.testing.assert_close(fused, frgca(plain, tokens, lm), rtol=1e-5, atol=1e-5)
    assert (fused - plain).abs().max() > 1e-3  # the landmarks really change the tokens


@torch.no_grad()
def test_masked_frgca_matches_the_formula(tmp_path):
    from facellava.model.tiny import make_tiny_checkpoint

    model = FaceLlava.from_pretrained(make_tiny_checkpoint(tmp_path / "masked", seed=1, cross_attn="masked"))
    frgca = model.landmarks_cross_attn
    lm = face_landmarks(1)
    tokens = model.landmark_tokens(lm)
    line = [(i + 0.5) / 16 for i in range(16)]
    centres = [(0.0, 0.0)] + [(line[i], line[j]) for i in range(16) for j in range(16)]  # official "ij" grid
    centroids = [lm[0, start:stop].mean(0) for _, start, stop in contract.LANDMARK_REGIONS]
    visual = torch.randn(1, 257, 256, generator=torch.Generator().manual_seed(9))
    block = frgca.cross_attn
    q, k, v = block.q_proj(visual[0]), block.k_proj(tokens[0]), block.v_proj(tokens[0])
    attended = torch.zeros(257, 256)
    for n in (0, 1, 17, 200, 256):
        dist = torch.tensor([0.0 if n == 0 else math.dist(centres[n], c.tolist()) for c in centroids])
        bias = torch.softmax(-dist, dim=0)
        for h in range(8):
            sl = slice(h * 32, (h + 1) * 32)
            w = torch.softmax(q[n, sl] @ k[:, sl].T / math.sqrt(32) + bias, dim=0)
            attended[n, sl] = w @ v[:, sl]
    expected = 0.1 * frgca.linear_proj(block.ln(visual[0] + attended)) + visual[0]
    ours = frgca(visual, tokens, lm)[0]
    for n in (0, 1, 17, 200, 256):
        torch.testing.assert_close(ours[n], expected[n], rtol=1e-5, atol=1e-5)
    # both modalities run through the masked form
    assert model.encode_video(pixels(1, video=True), face_landmarks(1, 8)).shape == (1, 8, 257, 256)
    assert model.encode_image(pixels(1), lm).shape == (1, 256, 256)


@torch.no_grad()
def test_branch_scale_is_configurable(tiny_checkpoint, tiny_model):
    other = FaceLlava.from_pretrained(tiny_checkpoint, branch_scale=0.001)
    x, lm = pixels(1), face_landmarks(1)
    plain = tiny_model.encode_image(x)
    delta_default = tiny_model.encode_image(x, lm) - plain
    delta_small = other.encode_image(x, lm) - plain
    torch.testing.assert_close(delta_small, delta_default * 0.01, rtol=1e-3, atol=1e-6)


@torch.no_grad()
def test_video_encoding_shapes_and_no_landmark_path(tiny_model):
    x = pixels(2, video=True)
    lm = face_landmarks(2, 8)
    plain = tiny_model.encode_video(x)
    assert plain.shape == (2, 8, 257, 256)
    torch.testing.assert_close(plain, tiny_model.mm_projector(tiny_model.video_tower(x)))
    fused = tiny_model.encode_video(x, lm)
    assert fused.shape == plain.shape and (fused - plain).abs().max() > 1e-3
    # FRGCA works per frame: changing frame 3's landmarks changes only frame 3
    lm2 = lm.clone()
    lm2[:, 3] += 0.05
    changed = (tiny_model.encode_video(x, lm2) - fused).abs().amax(dim=(0, 2, 3))
    assert changed[3] > 1e-4 and changed[[0, 1, 2, 4, 5, 6, 7]].max() == 0
    # frames interact through the temporal blocks: changing frame 0's pixels changes frame 5's tokens
    x2 = x.clone()
    x2[:, :, 0] += 0.5
    assert (tiny_model.encode_video(x2)[:, 5] - plain[:, 5]).abs().max() > 1e-4


@torch.no_grad()
def test_generate_reference_is_greedy_over_the_spliced_prompt(tiny_model):
    lm = face_landmarks(1)
    block = tiny_model.encode_image(pixels(1), lm)[0]
    ids = tiny_model.prompt_ids("What emotion is shown?", "image")
    out = tiny_model.generate_reference(ids, [block], max_new_tokens=8, stop_at_eos=False)
    assert len(out.tokens) == 8 and out.logits.shape == (8, tiny_model.config.vocab_size)
    # the same tokens by recomputing the whole sequence at each step, no KV cache
    embeds = tiny_model.embed_prompt(ids, [block])
    assert embeds.shape[0] == len(ids) - 1 + 256
    sequence = embeds
    for step, token in enumerate(out.tokens):
        logits = tiny_model.llm(inputs_embeds=sequence[None]).logits[0, -1]
        torch.testing.assert_close(logits, out.logits[step], rtol=1e-4, atol=1e-4)
        assert int(logits.argmax()) == token
        sequence = torch.cat([sequence, tiny_model.llm.get_input_embeddings()(torch.tensor([token]))])
    assert isinstance(out.text, str)
    with pytest.raises(ValueError, match="visual"):
        tiny_model.embed_prompt(ids, [])


@torch.no_grad()
def test_one_entry_encodes_an_image_or_a_video_by_the_pixels_rank(tiny_model):
    image, video = pixels(2), pixels(1, video=True)
    torch.testing.assert_close(tiny_model.encode(image, face_landmarks(2)),
                               tiny_model.encode_image(image, face_landmarks(2)), rtol=0, atol=0)
    torch.testing.assert_close(tiny_model.encode(video), tiny_model.encode_video(video), rtol=0, atol=0)
    blocks = tiny_model.visual_blocks(video, face_landmarks(1, 8))
    assert [tuple(b.shape) for b in blocks] == [(257, 256)] * 8
    torch.testing.assert_close(blocks[5], tiny_model.encode_video(video, face_landmarks(1, 8))[0, 5], rtol=0, atol=0)
    assert [tuple(b.shape) for b in tiny_model.visual_blocks(image[:1])] == [(256, 256)]
    # the blocks splice where the markers are: block i fills the rows after the i-th marker's text
    ids = tiny_model.prompt_ids("What emotion is shown?", "video")
    embeds = tiny_model.embed_prompt(ids, blocks)
    first = ids.index(contract.IMAGE_TOKEN_INDEX)
    assert embeds.shape[0] == contract.spliced_length(ids, [257] * 8)
    torch.testing.assert_close(embeds[first:first + 257], blocks[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="image batch"):
        tiny_model.encode(image[0])
    with pytest.raises(ValueError, match="batch 1"):
        tiny_model.visual_blocks(image)
