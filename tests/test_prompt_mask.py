"""`UNetConfig.mask_padding`: cross-attention that reads the prompt's tokens and not the padding after them.

The mask is built from token ids (`prompt_mask`), passed by the pipeline with every U-Net call (both halves of
classifier-free guidance, every chunk of a long prompt) and by training (frozen or trained text encoder), and
a masked token has no effect on anything."""

import dataclasses

import pytest
import torch
from conftest import tiny_bundle

from sfumato.checkpoints.bundle import ScheduleConfig, load_bundle, save_bundle
from sfumato.checkpoints.keymaps import unet_to_diffusers
from sfumato.models.clip import prompt_mask
from sfumato.models.unet import UNET_PRESETS, UNet
from sfumato.pipelines.stable_diffusion import StableDiffusion
from sfumato.training.ldm import LDMTask
from sfumato.training.task import BatchRandom

EOS = 9


def test_prompt_mask_ends_at_the_first_end_token():
    ids = torch.tensor([
        [8, 1, 2, EOS, EOS, EOS],  # SD 1.x: padding is the end token itself
        [8, 1, EOS, 0, 0, 0],  # SD 2.x folders: padding "!" (id 0)
        [8, 1, 2, 3, 4, 5],  # cut at the context length: no end token
        [8, EOS, EOS, EOS, EOS, EOS],  # the empty prompt
    ])  # fmt: skip
    expected = torch.tensor([
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0],
    ]).bool()  # fmt: skip
    assert torch.equal(prompt_mask(ids, EOS), expected)


def _unet(mask_padding: bool) -> UNet:
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(UNET_PRESETS["tiny"], num_heads=2, mask_padding=mask_padding)).eval()
    for p in unet.parameters():  # proj_out and the output conv start at zero: give the text a say
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.2)
    return unet


@torch.no_grad()
def test_masked_tokens_have_no_effect():
    unet = _unet(True)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 6, unet.config.context_dim)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]).bool()
    out = unet(x, t, context, context_mask=mask)
    other = context.clone()
    other[0, 3:], other[1, 5] = 7.0, -3.0  # only masked tokens change
    torch.testing.assert_close(unet(x, t, other, context_mask=mask), out, rtol=0, atol=0)
    other[0, 2] = 1.0  # a token that is read
    assert (unet(x, t, other, context_mask=mask) - out)[0].abs().max() > 1e-3
    # no mask = every token read; and the masked model is a different function of the padding
    torch.testing.assert_close(unet(x, t, context, context_mask=torch.ones(2, 6, dtype=torch.bool)),
                               unet(x, t, context), rtol=0, atol=1e-6)  # fmt: skip
    assert (unet(x, t, context) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"context_mask must be a bool tensor of shape \(2, 6\)"):
        unet(x, t, context, context_mask=mask.float())
    with pytest.raises(ValueError, match="needs a True token"):
        unet(x, t, context, context_mask=torch.zeros(2, 6, dtype=torch.bool))


class Recorder(torch.nn.Module):
    """The U-Net, remembering the keyword arguments of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.calls = unet, unet.config, []

    def forward(self, x, t, context, **kw):
        self.calls.append({"context": context, **kw})
        return self.unet(x, t, context, **kw)


def _masked_bundle():
    bundle = tiny_bundle()
    config = dataclasses.replace(bundle.unet.config, mask_padding=True)
    unet = UNet(config)
    unet.load_state_dict(bundle.unet.state_dict())
    return dataclasses.replace(bundle, unet=unet)


def test_the_pipeline_passes_the_prompt_mask_to_both_halves_of_guidance(tmp_path):
    bundle = _masked_bundle()
    save_bundle(bundle, tmp_path / "model")
    pipe = StableDiffusion(load_bundle(tmp_path / "model"))
    assert pipe.unet.config.mask_padding  # kept by the bundle's config
    tok = pipe.tokenizer
    pipe.unet = rec = Recorder(pipe.unet)
    pipe.generate("a red square", "a blue circle on the left", steps=2, guidance=4.0, seed=0, width=16, height=16)
    kw = rec.calls[0]
    L = tok.context_length
    assert kw["context_mask"].shape == (2, L)  # [uncond; cond]
    for row, text in zip(kw["context_mask"], ["a blue circle on the left", "a red square"]):
        n = len(tok.encode(text))  # start + body + end
        assert torch.equal(row, torch.arange(L) < n), text

    # a prompt longer than the context: every chunk has its own start and end tokens, each read
    words = " ".join(["red square"] * L)
    body = len(tok.encode(words)) - 2
    sizes = [min(L - 2, body - i) for i in range(0, body, L - 2)]  # tokens per chunk
    assert len(sizes) >= 2
    rec.calls.clear()
    pipe.generate(words, steps=1, guidance=4.0, seed=0, width=16, height=16)
    uncond, cond = rec.calls[0]["context_mask"]
    assert torch.equal(cond, torch.cat([torch.arange(L) < n + 2 for n in sizes]))
    assert torch.equal(uncond, torch.cat([torch.arange(L) < 2 for _ in sizes]))  # "" in as many chunks

    # a negative prompt longer than the prompt: the prompt is padded with empty chunks, masks included
    rec.calls.clear()
    pipe.generate("a red square", words, steps=1, guidance=4.0, seed=0, width=16, height=16)
    uncond, cond = rec.calls[0]["context_mask"]
    n = len(tok.encode("a red square"))
    assert torch.equal(uncond, torch.cat([torch.arange(L) < k + 2 for k in sizes]))
    assert torch.equal(cond, torch.cat([torch.arange(L) < n] + [torch.arange(L) < 2 for _ in sizes[1:]]))

    # and the mask is what the U-Net reads: garbage in the padding states leaves the image as it was
    image = pipe.generate("a red square", steps=2, guidance=4.0, seed=3, width=16, height=16)[0]
    encoder = pipe.text_encoder

    class Garbage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = encoder.config

        def forward(self, ids, skip=0):
            out = encoder(ids, skip=skip)
            pad = ~prompt_mask(ids, tok.eos_token_id)
            out.last_hidden_state[pad] = 100.0
            return out

    pipe.text_encoder = Garbage()
    again = pipe.generate("a red square", steps=2, guidance=4.0, seed=3, width=16, height=16)[0]
    assert again.tobytes() == image.tobytes()


def test_training_reads_the_same_mask(tmp_path):
    """The loss with a frozen text encoder, with the trained copy, and with the U-Net called by hand on the
    masked contexts agree; without the mask it differs."""
    bundle = _masked_bundle()
    schedule = ScheduleConfig(prediction="v")
    args = (bundle.vae, bundle.text_encoder, bundle.tokenizer, schedule)
    frozen = LDMTask(None, *args, unet=bundle.unet, caption_dropout=0.3)
    joint = LDMTask(None, *args, unet=bundle.unet, caption_dropout=0.3, train_text_encoder=True)
    plain_unet = UNet(dataclasses.replace(bundle.unet.config, mask_padding=False))
    plain_unet.load_state_dict(bundle.unet.state_dict())
    plain = LDMTask(None, *args, unet=plain_unet, caption_dropout=0.3)
    captions = ["a red square", "a blue circle on the left of a green square", "a yellow triangle", "a circle"]
    idx = torch.arange(4)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": captions, "index": idx}
    with torch.no_grad():
        a = frozen.loss(batch, BatchRandom(1, 0, idx), 0, frozen.trainable())[0]
        b = joint.loss(batch, BatchRandom(1, 0, idx), 0, joint.trainable())[0]
        c = plain.loss(batch, BatchRandom(1, 0, idx), 0, plain.trainable())[0]
        x = frozen.prepare(batch, BatchRandom(1, 0, idx), torch.device("cpu"))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert abs(float(a) - float(c)) > 1e-6  # float noise is ~1e-8 here
    kept = [("" if d else cap) for cap, d in zip(captions, x["drop"].tolist())]
    assert torch.equal(x["context_mask"], prompt_mask(bundle.tokenizer(kept), bundle.tokenizer.eos_token_id))


def test_diffusers_export_refuses_a_masked_unet():
    unet = _unet(True)
    with pytest.raises(ValueError, match="mask_padding=True.*encoder_attention_mask"):
        unet_to_diffusers(unet.state_dict(), unet.config)
