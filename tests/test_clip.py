"""CLIP towers against transformers (same random weights), the open_clip key layout, and key errors.

The reference models run transformers' eager attention (explicit softmax and additive causal mask), so the
comparison does not share our scaled_dot_product_attention path.
"""

from dataclasses import asdict

import pytest
import torch
import transformers
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

from sfumato.checkpoints.clip_keys import (
    from_openai_clip,
    from_transformers,
    infer_config,
    load_clip_state_dict,
    to_openai_clip,
)
from sfumato.models.clip import (
    CLIP,
    PRESETS,
    TEXT_PRESETS,
    CLIPConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

TOL = 1e-4
VOCAB, CTX, BOS, EOS = 100, 16, 98, 99
ACTS = ["quick_gelu", "gelu"]


def _hf_text_config(act, projection_dim=24):
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=CTX, hidden_act=act, projection_dim=projection_dim,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, attn_implementation="eager",
    )


def _hf_vision_config(act, projection_dim=24):
    return transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, hidden_act=act, projection_dim=projection_dim, attn_implementation="eager",
    )


def _randomise(model, seed=0):
    """Every parameter random and O(1), LayerNorm gains around 1: nothing is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif name == "logit_scale":
                p.fill_(2.5)
            elif p.ndim >= 2:  # Linear / conv / embedding tables: std 0.6 / sqrt(fan_in)
                p.copy_(0.6 * noise / p[0].numel() ** 0.5)
            else:  # biases, LayerNorm shifts, the class embedding
                p.copy_(0.3 * noise)
    return model.eval()


def _ids(batch=4):
    """Token rows shaped like the tokenizer's: BOS, words, EOS at varied places, EOS padding after it."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, BOS, (batch, CTX), generator=g)
    ids[:, 0] = BOS
    for row, end in enumerate([3, CTX - 1, 7, 1][:batch]):
        ids[row, end:] = EOS
    return ids


def _pixels(batch=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _ours_text_config(act, projection_dim=24):
    return CLIPTextConfig(vocab_size=VOCAB, context_length=CTX, width=48, layers=3, heads=4, mlp_width=96,
                          act=act, eos_token_id=EOS, projection_dim=projection_dim)


def _ours_vision_config(act, projection_dim=24):
    return CLIPVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_width=128, act=act,
                            projection_dim=projection_dim)


def _maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("act", ACTS)
def test_text_model_matches_transformers(act):
    ref = _randomise(transformers.CLIPTextModel(_hf_text_config(act)))
    ours = CLIPTextModel(_ours_text_config(act, projection_dim=None)).eval()
    load_clip_state_dict(ours, from_transformers(ref.state_dict()))
    ids = _ids()
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids, output_hidden_states=True)
        assert _maxdiff(o.last_hidden_state, r.last_hidden_state) <= TOL
        assert _maxdiff(o.pooled, r.pooler_output) <= TOL
        assert len(o.hidden_states) == len(r.hidden_states) == 4
        for mine, theirs in zip(o.hidden_states, r.hidden_states):
            assert _maxdiff(mine, theirs) <= TOL
        # clip skip / SD 2.x penultimate layer: final_layer_norm(hidden_states[-(skip + 1)])
        for skip in (1, 2):
            expected = ref.final_layer_norm(r.hidden_states[-(skip + 1)])
            got = ours(ids, skip=skip)
            assert _maxdiff(got.last_hidden_state, expected) <= TOL
            assert _maxdiff(got.pooled, r.pooler_output) <= TOL  # pooled always from the last block
    assert o.last_hidden_state.abs().max() > 0.5  # not a degenerate comparison


@pytest.mark.parametrize("act", ACTS)
def test_text_projection_matches_transformers(act):
    ref = _randomise(transformers.CLIPTextModelWithProjection(_hf_text_config(act)))
    ours = CLIPTextModel(_ours_text_config(act)).eval()
    load_clip_state_dict(ours, ref.state_dict())  # same keys: text_model.* + text_projection.weight
    ids = _ids()
    with torch.no_grad():
        assert _maxdiff(ours(ids).embeds, ref(ids).text_embeds) <= TOL


@pytest.mark.parametrize("act", ACTS)
def test_vision_model_matches_transformers(act):
    ref = _randomise(transformers.CLIPVisionModelWithProjection(_hf_vision_config(act)))
    ours = CLIPVisionModel(_ours_vision_config(act)).eval()
    load_clip_state_dict(ours, ref.state_dict())
    px = _pixels()
    with torch.no_grad():
        r = ref(px, output_hidden_states=True)
        o = ours(px, output_hidden_states=True)
        assert _maxdiff(o.last_hidden_state, r.last_hidden_state) <= TOL
        assert _maxdiff(o.embeds, r.image_embeds) <= TOL
        assert len(o.hidden_states) == len(r.hidden_states)
        for mine, theirs in zip(o.hidden_states, r.hidden_states):
            assert _maxdiff(mine, theirs) <= TOL
        pooled = ref.vision_model.post_layernorm(r.last_hidden_state[:, 0])
        assert _maxdiff(o.pooled, pooled) <= TOL


def _hf_clip(act):
    cfg = transformers.CLIPConfig(text_config=_hf_text_config(act).to_dict(),
                                  vision_config=_hf_vision_config(act).to_dict(), projection_dim=24)
    cfg._attn_implementation = "eager"
    return _randomise(transformers.CLIPModel(cfg))


def _check_clip_outputs(ours, ref):
    ids, px = _ids(), _pixels()
    with torch.no_grad():
        r = ref(input_ids=ids, pixel_values=px)
        per_image, per_text = ours(ids, px)
        assert per_image.shape == (3, 4) and per_text.shape == (4, 3)
        assert _maxdiff(per_image, r.logits_per_image) <= TOL
        assert _maxdiff(per_text, r.logits_per_text) <= TOL
        assert _maxdiff(ours.encode_text(ids), ref.get_text_features(input_ids=ids).pooler_output) <= TOL
        assert _maxdiff(ours.encode_image(px), ref.get_image_features(pixel_values=px).pooler_output) <= TOL


@pytest.mark.parametrize("act", ACTS)
def test_clip_model_matches_transformers(act):
    ref = _hf_clip(act)
    ours = CLIP(CLIPConfig(text=_ours_text_config(act), vision=_ours_vision_config(act))).eval()
    load_clip_state_dict(ours, ref.state_dict())
    _check_clip_outputs(ours, ref)


@pytest.mark.parametrize("act", ACTS)
def test_open_clip_layout_loads(act):
    ref = _hf_clip(act)
    openai_sd = to_openai_clip(ref.state_dict())
    assert "transformer.resblocks.0.attn.in_proj_weight" in openai_sd
    assert torch.equal(openai_sd["text_projection"], ref.text_projection.weight.t())  # (width, embed_dim)
    assert openai_sd["visual.proj"].shape == (64, 24)
    assert openai_sd["visual.transformer.resblocks.1.attn.in_proj_bias"].shape == (3 * 64,)

    # diffusers' own open_clip (SD 2.x) text converter reads our open_clip layout back to transformers names
    prefix = "cond_stage_model.model."
    single_file = {prefix + k: v for k, v in openai_sd.items()}
    single_file["model.diffusion_model.some.unet.weight"] = torch.zeros(1)  # other components ride along
    theirs = convert_open_clip_checkpoint(ref.text_model, single_file, prefix=prefix)
    text_keys = {k: v for k, v in ref.state_dict().items() if k.startswith("text_model.")}
    assert set(theirs) == set(text_keys)  # diffusers drops SD 2.x's text_projection; checked below
    assert all(torch.equal(theirs[k], text_keys[k]) for k in theirs)

    # ... and ours converts the whole open_clip dict back, config inferred from shapes
    sd = from_openai_clip(single_file, prefix=prefix)
    assert set(sd) == set(ref.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    cfg = infer_config(sd, act=act, eos_token_id=EOS, text_heads=4, vision_heads=4)  # toy widths, not 64k
    assert cfg == CLIPConfig(text=_ours_text_config(act), vision=_ours_vision_config(act))
    ours = CLIP(cfg).eval()
    load_clip_state_dict(ours, sd)
    _check_clip_outputs(ours, ref)


def test_sd2_style_text_encoder_from_open_clip_layout():
    """SD 2.x: an open_clip text tower alone (no `visual.*`), gelu, read at the penultimate layer."""
    ref = _randomise(transformers.CLIPTextModelWithProjection(_hf_text_config("gelu")))
    openai_sd = to_openai_clip(ref.state_dict(), prefix="cond_stage_model.model.")
    openai_sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)  # SD 2.x files keep it
    sd = from_openai_clip(openai_sd, prefix="cond_stage_model.model.")
    sd.pop("logit_scale")  # belongs to the joint model, not to the text encoder
    cfg = infer_config(sd, act="gelu", eos_token_id=EOS, text_heads=4)  # toy width 48: heads not 48 / 64
    assert cfg == _ours_text_config("gelu")
    ours = CLIPTextModel(cfg).eval()
    load_clip_state_dict(ours, sd)
    ids = _ids()
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        penultimate = ref.text_model.final_layer_norm(r.hidden_states[-2])
        assert _maxdiff(ours(ids, skip=1).last_hidden_state, penultimate) <= TOL


def test_sd1_single_file_text_encoder_loads_with_a_prefix_strip():
    ref = _randomise(transformers.CLIPTextModel(_hf_text_config("quick_gelu")))
    prefix = "cond_stage_model.transformer."
    single_file = {prefix + "text_model." + k: v for k, v in ref.state_dict().items()}
    # transformers < 4.31 saved this buffer; SD 1.x files carry it, sometimes as damaged floats
    single_file[prefix + "text_model.embeddings.position_ids"] = torch.arange(CTX)[None] - 0.3
    single_file["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    sd = {k[len(prefix):]: v for k, v in single_file.items() if k.startswith(prefix)}
    ours = CLIPTextModel(_ours_text_config("quick_gelu", projection_dim=None)).eval()
    ours.load_state_dict(sd, strict=True)  # plain torch loading, no renames
    with torch.no_grad():
        assert _maxdiff(ours(_ids()).last_hidden_state, ref(_ids()).last_hidden_state) <= TOL


def test_openai_round_trip_and_metadata_keys():
    model = CLIP(PRESETS["tiny-siglip"])
    sd = model.state_dict()
    openai_sd = to_openai_clip(sd)
    assert "logit_bias" in openai_sd
    openai_sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77),
                     vocab_size=torch.tensor(49408))  # OpenAI TorchScript archives carry these
    back = from_openai_clip(openai_sd)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_siglip_bias_and_temperature():
    model = CLIP(PRESETS["tiny-siglip"]).eval()
    ids = torch.randint(0, 49406, (2, 77))
    ids[:, 0], ids[:, 9:] = 49406, 49407
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        per_image, per_text = model(ids, px)
        cos = model.encode_image(px, normalize=True) @ model.encode_text(ids, normalize=True).t()
    assert torch.allclose(per_image, 10.0 * cos - 10.0, atol=1e-5)
    assert torch.equal(per_text, per_image.t())


def test_config_round_trips_through_asdict():
    for cfg in PRESETS.values():
        assert CLIPConfig(**asdict(cfg)) == cfg
    for cfg in TEXT_PRESETS.values():
        assert CLIPTextConfig(**asdict(cfg)) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_on_meta_and_infer_back(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = CLIP(cfg)
    assert model.logit_scale.is_meta
    sd = from_openai_clip(to_openai_clip(model.state_dict()))  # shapes survive the open_clip layout
    heads = {"text_heads": 4, "vision_heads": 4} if name.startswith("tiny") else {}  # real: width / 64 ...
    assert infer_config(sd, act=cfg.text.act, **heads) == cfg  # ... or ViT-H's 16 heads of 80


def test_sizes_match_transformers():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    hf_l14 = transformers.CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, patch_size=14),
        projection_dim=768,
    )
    hf_h14_text = transformers.CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, hidden_act="gelu", projection_dim=1024)
    with torch.device("meta"):
        assert count(CLIP(PRESETS["vit-l-14"])) == count(transformers.CLIPModel(hf_l14)) == 427_616_513
        assert count(CLIPTextModel(TEXT_PRESETS["vit-l-14"])) == count(
            transformers.CLIPTextModel(hf_l14.text_config)) == 123_060_480  # SD 1.x text encoder
        assert count(CLIPTextModel(TEXT_PRESETS["vit-h-14-text"])) == count(
            transformers.CLIPTextModelWithProjection(hf_h14_text))


# ---- errors -------------------------------------------------------------------------------------------


def test_unknown_open_clip_key_is_named():
    sd = to_openai_clip(CLIP(PRESETS["tiny"]).state_dict())
    sd["visual.attnpool.c_proj.weight"] = torch.zeros(4, 4)
    with pytest.raises(KeyError, match="visual.attnpool.c_proj.weight"):
        from_openai_clip(sd)


def test_misshaped_fused_qkv_is_named():
    sd = to_openai_clip(CLIP(PRESETS["tiny"]).state_dict())
    sd["transformer.resblocks.1.attn.in_proj_weight"] = torch.zeros(64 * 3 + 1, 64)
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.1\.attn\.in_proj_weight"):
        from_openai_clip(sd)
    sd = to_openai_clip(CLIP(PRESETS["tiny"]).state_dict())
    sd["text_projection"] = torch.zeros(64)
    with pytest.raises(ValueError, match="text_projection"):
        from_openai_clip(sd)


def test_missing_q_k_or_v_is_named():
    sd = CLIP(PRESETS["tiny"]).state_dict()
    del sd["vision_model.encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(KeyError, match=r"visual\.transformer\.resblocks\.1\.attn\.in_proj_bias.*'k'"):
        to_openai_clip(sd)


def test_load_errors_name_the_key():
    model = CLIPTextModel(TEXT_PRESETS["tiny"])
    good = model.state_dict()
    with pytest.raises(KeyError, match="logit_scale"):
        load_clip_state_dict(model, {**good, "logit_scale": torch.tensor(1.0)})
    missing = dict(good)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(KeyError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_clip_state_dict(model, missing)
    bad = {**good, "text_model.embeddings.position_embedding.weight": torch.zeros(76, 64)}
    with pytest.raises(ValueError, match=r"position_embedding\.weight.*\(76, 64\).*\(77, 64\)"):
        load_clip_state_dict(model, bad)


def test_config_errors_speak():
    with pytest.raises(ValueError, match="heads=5"):
        CLIPTextConfig(width=64, heads=5)
    with pytest.raises(ValueError, match="'relu'"):
        CLIPVisionConfig(act="relu")
    with pytest.raises(ValueError, match="image_size=225"):
        CLIPVisionConfig(image_size=225, patch_size=14)
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPConfig(text=CLIPTextConfig(projection_dim=None), vision=CLIPVisionConfig(projection_dim=768))
    model = CLIPTextModel(TEXT_PRESETS["tiny"])
    with pytest.raises(ValueError, match="longer than the model's context_length=77"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="skip must be in"):
        model(torch.zeros(1, 5, dtype=torch.long), skip=2)
    with pytest.raises(ValueError, match="32x32"):
        CLIPVisionModel(PRESETS["tiny"].vision)(torch.zeros(1, 3, 64, 64))


# ---- full size ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vit_l14_text_encoder_key_set_loads_on_meta():
    """The SD 1.x text encoder: transformers CLIPTextModel from openai/clip-vit-large-patch14's published
    text config, random weights, saved the way SD 1.x single files store it."""
    published = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(published).eval()
    single_file = {"cond_stage_model.transformer.text_model." + k: v for k, v in ref.state_dict().items()}
    single_file["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd = from_transformers(single_file, prefix="cond_stage_model.transformer.")
    assert infer_config(sd, act="quick_gelu") == TEXT_PRESETS["vit-l-14"]
    with torch.device("meta"):
        ours = CLIPTextModel(TEXT_PRESETS["vit-l-14"])
    load_clip_state_dict(ours, sd, assign=True)
    assert not any(p.is_meta for p in ours.parameters())
    assert {k for k in ours.state_dict()} == set(sd) - {"text_model.embeddings.position_ids"}
    ids = torch.tensor([[49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407] + [49407] * 67])
    with torch.no_grad():
        r, o = ref(ids, output_hidden_states=True), ours.eval()(ids, skip=1)
        assert _maxdiff(o.pooled, r.pooler_output) <= TOL
        assert _maxdiff(o.last_hidden_state, ref.final_layer_norm(r.hidden_states[-2])) <= TOL
