"""maskopt.rewards on tiny CLIP models saved to disk and loaded back through the hub-id code paths."""

from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from maskopt.errors import MaskoptError
from maskopt.rewards import REWARDS, WeightedSum, load_reward, valid_names
from maskopt.rewards import aesthetic, base, hpsv2, pickscore
from maskopt.rewards.clip import Preprocess, load_preprocess
from tiny_clip import IMAGE_SIZE, save_preprocessor, save_tiny_clip, to_open_clip

PROMPTS = ["a red cat", "a dog", "the red dog sat on a mat", "cat", "a very long prompt " * 6]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, model): a tiny CLIP saved like a hub repo (weights, tokenizer, preprocessor config)."""
    path = tmp_path_factory.mktemp("clip")
    return path, save_tiny_clip(path)


@pytest.fixture(scope="module")
def images():
    # Smooth random images: what a generator makes, and resizing behaves the same in PIL and torch.
    torch.manual_seed(1)
    low = torch.rand(len(PROMPTS), 3, 8, 8)
    return torch.nn.functional.interpolate(low, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")


def reference_logits(model, directory, images, prompts):
    """CLIP's (images x prompts) logits computed with transformers directly (CLIPModel.forward)."""
    from transformers import CLIPTokenizer

    tokens = CLIPTokenizer.from_pretrained(directory)(prompts, padding=True, truncation=True, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():  # images are already IMAGE_SIZE square: preprocessing is just normalising
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=(images - mean) / std)
    return out.logits_per_image, model.logit_scale.exp().item()


def all_pairs(reward, images, prompts):
    n = len(prompts)
    return reward(images.repeat_interleave(n, dim=0), prompts * n).reshape(n, n)


# --- names and specs -----------------------------------------------------------------------

def test_names_are_listed():
    assert set(REWARDS) == {"aesthetic", "clip", "digits", "digits-kernel", "hpsv2", "imagereward", "pickscore"}
    assert valid_names() == "aesthetic, clip, digits, digits-kernel, hpsv2, imagereward, pickscore, python:module:function"


@pytest.mark.parametrize("spec, message", [
    ("clipp", "unknown reward 'clipp'; valid: aesthetic, clip, digits, digits-kernel, hpsv2, imagereward, pickscore, "
              "python:module:function"),
    ("", "empty reward spec; valid: aesthetic"),
    ("clip@", "nothing after '@'"),
    ("clip=1,hps=2", "unknown reward 'hps'; valid: aesthetic"),
    ("clip=1,", "empty term"),
    ("clip=one", "bad weight 'one' in reward term 'clip=one'"),
    ("clip=nan", "bad weight 'nan'"),
    ("clip,aesthetic", "needs a name and a weight"),
    ("clip=1,clip=2", "names a term twice"),
    ("python:reward_fns", "write it as python:module:function"),
    ("python:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("python:reward_fns:nope", "has no function 'nope'"),
    ("hpsv2@./no/such/file.pt", "checkpoint './no/such/file.pt' is not a path that exists, nor a hub id"),
    ("clip@/no/such/clip", "CLIP model '/no/such/clip' is not a path that exists, nor a hub id 'org/name'"),
    ("aesthetic@models/head.pth", "checkpoint 'models/head.pth' is not a path that exists, nor a hub id"),
])
def test_bad_specs_are_rejected_in_one_line(spec, message):
    with pytest.raises(ValueError) as err:
        load_reward(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_clip_is_100_cos_as_transformers_computes_it(tiny, images):
    directory, model = tiny
    reward = load_reward(f"clip@{directory}")
    assert reward.name == f"clip@{directory}"
    scores = reward(images, PROMPTS)
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    logits, scale = reference_logits(model, directory, images, PROMPTS)
    expected = 100 * logits / scale
    assert torch.allclose(all_pairs(reward, images, PROMPTS), expected, atol=1e-4)
    # Ranking: for each image, prompts order as CLIP orders them.
    assert torch.equal(all_pairs(reward, images, PROMPTS).argsort(dim=1), expected.argsort(dim=1))


def test_scores_do_not_depend_on_batching(tiny, images):
    directory, _ = tiny
    reward = load_reward(f"clip@{directory}")
    reward.batch_size = 16
    together = reward(images, PROMPTS)
    reward.embedder._text_cache.clear()
    reward.batch_size = 1
    one_by_one = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(len(PROMPTS))])
    reward.batch_size = 2
    pairs = reward(images, PROMPTS)
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert torch.allclose(together, pairs, atol=1e-5)


def test_any_image_size_and_bad_inputs(tiny):
    directory, _ = tiny
    reward = load_reward(f"clip@{directory}")
    for h, w in [(64, 64), (48, 80), (17, 9)]:
        assert reward(torch.rand(2, 3, h, w), PROMPTS[:2]).shape == (2,)
    assert reward(torch.rand(0, 3, 32, 32), []).shape == (0,)
    with pytest.raises(ValueError, match="one prompt per image: 2 images, 1 prompts"):
        reward(torch.rand(2, 3, 32, 32), PROMPTS[:1])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) tensor, got \(3, 32, 32\)"):
        reward(torch.rand(3, 32, 32), PROMPTS[:1])
    with pytest.raises(ValueError, match="float in"):
        reward(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), PROMPTS[:1])


def test_preprocess_matches_clip_image_processor(tiny):
    from transformers import CLIPImageProcessor

    directory, _ = tiny
    processor = CLIPImageProcessor.from_pretrained(directory)
    preprocess = load_preprocess(str(directory), image_size=999)  # the config's 32 must win
    assert preprocess == Preprocess(size=32, crop=(32, 32))
    torch.manual_seed(2)
    for shape in [(48, 80), (80, 48), (20, 20)]:
        image = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12), size=shape, mode="bilinear")
        pixels = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        expected = processor(images=Image.fromarray(pixels), return_tensors="pt").pixel_values
        got = preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
        # PIL resizes uint8, we resize floats: about one grey level apart on average (0.004 in
        # normalised units, at most 0.05 when upsampling); a crop one pixel off is 0.2 apart.
        assert got.shape == expected.shape == (1, 3, 32, 32)
        assert (got - expected).abs().mean() < 0.01 and (got - expected).abs().max() < 0.1


def test_preprocess_reads_size_and_mean_from_config(tmp_path):
    save_preprocessor(tmp_path, size=40, crop=36, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    preprocess = load_preprocess(str(tmp_path), image_size=32)
    assert preprocess == Preprocess(size=40, crop=(36, 36), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.allclose(preprocess(torch.full((1, 3, 50, 70), 0.75)), torch.ones(1, 3, 36, 36))
    # No preprocessor_config.json: the vision config's image size and OpenAI's mean/std.
    (tmp_path / "preprocessor_config.json").unlink()
    assert load_preprocess(str(tmp_path), image_size=24) == Preprocess(size=24, crop=(24, 24))


def test_pad_fit_letterboxes_like_hpsv2():
    preprocess = Preprocess(size=32, crop=(32, 32), mean=(0, 0, 0), std=(1, 1, 1), fit="pad")
    out = preprocess(torch.ones(1, 3, 16, 64))  # wide: 64 -> 32 across, 16 -> 8 down, 12 + 12 rows of padding
    assert out.shape == (1, 3, 32, 32)
    assert out[..., :12, :].abs().max() == 0 and out[..., 20:, :].abs().max() == 0
    assert torch.allclose(out[..., 12:20, :], torch.ones(1, 3, 8, 32))


def hpsv2_reference_transform(u8, size, mean, std):
    """hpsv2 1.2.0's inference transform as hpsv2.score() runs it: its bundled open_clip 2.16's
    image_transform(resize_longest_max=True) on a PIL image (the tensor branch of that ResizeMaxSize reads
    shape[:2], so only PIL images go through it): PIL bicubic resize of the longest side to `size`, zero
    padding (left/top the floor half), ToTensor, Normalize. Written from that code with PIL, not from maskopt's."""
    img = Image.fromarray(u8)
    w, h = img.size
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        img = img.resize((nw, nh), Image.BICUBIC)
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
        img = canvas
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("height,width", [(512, 512), (512, 768), (768, 512), (300, 200)])
def test_hpsv2_preprocessing_follows_its_reference(height, width):
    """Hard-edged images, where bicubic overshoots [0, 1] and PIL clips it: so does maskopt (without the clamp
    the mean difference is about 10x larger). PIL's fixed-point kernel differs from torch's by more than
    rounding in places, so this compares means, and the padding exactly."""
    from maskopt.rewards.clip import OPENAI_MEAN, OPENAI_STD

    rng = np.random.default_rng(height + width)
    cells = (rng.random((height // 16 + 1, width // 16 + 1, 3)) > 0.5).astype(np.uint8) * 255
    u8 = np.ascontiguousarray(np.repeat(np.repeat(cells, 16, 0), 16, 1)[:height, :width])
    want = hpsv2_reference_transform(u8, 224, OPENAI_MEAN, OPENAI_STD)
    got = Preprocess(size=224, crop=(224, 224), fit="pad")(torch.from_numpy(u8).permute(2, 0, 1).float()[None] / 255)
    assert got.shape == want.shape == (1, 3, 224, 224)
    error = (got - want).abs().mean()
    assert error < 0.004
    # the same steps without the clamp are further from the reference: the check can tell them apart
    x = torch.from_numpy(u8).permute(2, 0, 1).float()[None] / 255
    scale = 224 / max(height, width)
    nh, nw = round(height * scale), round(width * scale)
    y = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    y = torch.nn.functional.pad(y, ((224 - nw) // 2, 224 - nw - (224 - nw) // 2, (224 - nh) // 2, 224 - nh - (224 - nh) // 2))
    unclamped = (y - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    assert (unclamped - want).abs().mean() > 3 * error


# --- pickscore -----------------------------------------------------------------------------

def test_pickscore_is_logit_scale_times_cos(tiny, images):
    directory, model = tiny
    reward = load_reward(f"pickscore@{directory}")
    logits, scale = reference_logits(model, directory, images, PROMPTS)
    assert reward.scale == pytest.approx(scale)
    assert torch.allclose(all_pairs(reward, images, PROMPTS), logits, atol=1e-4)


def test_pickscore_takes_the_laion_processor_when_source_has_no_tokenizer(tiny, tmp_path, images, monkeypatch):
    directory, model = tiny
    bare = tmp_path / "bare"  # like the PickScore_v1 repo: weights and config, processor elsewhere
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(directory / name, bare / name)
    monkeypatch.setattr(pickscore, "PROCESSOR_SOURCE", str(directory))
    scores = load_reward(f"pickscore@{bare}")(images, PROMPTS)
    logits, _ = reference_logits(model, directory, images, PROMPTS)
    assert torch.allclose(scores, logits.diagonal(), atol=1e-4)


# --- hpsv2 ---------------------------------------------------------------------------------

def test_open_clip_mapping_fills_every_clipmodel_key(tiny):
    _, model = tiny
    state = model.state_dict()
    open_clip = to_open_clip(state)
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in open_clip and "visual.proj" in open_clip
    mapped = hpsv2.open_clip_to_transformers({**open_clip, "attn_mask": torch.zeros(16, 16)})
    assert set(mapped) == set(state)
    for key, value in state.items():
        assert torch.equal(mapped[key], value), key
    hpsv2.check_complete(mapped, model.config)


def test_open_clip_mapping_rejects_unknown_and_missing_keys(tiny):
    _, model = tiny
    open_clip = to_open_clip(model.state_dict())
    with pytest.raises(ValueError, match=r"1 open_clip keys .*: visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        hpsv2.open_clip_to_transformers({**open_clip, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)})
    mapped = hpsv2.open_clip_to_transformers(open_clip)
    del mapped["vision_model.post_layernorm.bias"]
    with pytest.raises(ValueError, match=r"1 CLIPModel keys not filled: vision_model\.post_layernorm\.bias"):
        hpsv2.check_complete(mapped, model.config)
    mapped = hpsv2.open_clip_to_transformers(open_clip)
    mapped["visual_projection.weight"] = mapped["visual_projection.weight"].t()
    with pytest.raises(ValueError, match=r"shapes differ .*visual_projection\.weight \(32, 16\) != \(16, 32\)"):
        hpsv2.check_complete(mapped, model.config)


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    """An HPSv2-style checkpoint ({"state_dict": open_clip keys}, float16 like the compressed files)
    from a tiny CLIP, next to that CLIP's config/tokenizer/preprocessor but not its weights."""
    path = tmp_path_factory.mktemp("hps")
    model = save_tiny_clip(path, seed=3, weights=False)
    state = {f"module.{k}": v.half() for k, v in to_open_clip(model.state_dict()).items()}
    torch.save({"epoch": 1, "name": "tiny", "state_dict": state}, path / "HPS_v2.1_compressed.pt")
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return path, model


def test_hpsv2_is_cos_of_the_checkpoint_weights(hps_dir, images):
    directory, model = hps_dir
    reward = load_reward(f"hpsv2@{directory}")
    assert not (directory / "model.safetensors").exists()  # the weights can only have come from the .pt
    logits, scale = reference_logits(model, directory, images, PROMPTS)
    assert torch.allclose(all_pairs(reward, images, PROMPTS), logits / scale, atol=1e-5)


def test_hpsv2_from_a_checkpoint_file_uses_the_base_repo(hps_dir, images, monkeypatch):
    directory, model = hps_dir
    monkeypatch.setattr(hpsv2, "BASE_SOURCE", str(directory))  # stands in for laion/CLIP-ViT-H-14-...
    reward = load_reward(f"hpsv2@{directory / 'HPS_v2.1_compressed.pt'}")
    logits, scale = reference_logits(model, directory, images, PROMPTS)
    assert torch.allclose(reward(images, PROMPTS), logits.diagonal() / scale, atol=1e-5)


def test_checkpoint_sources_resolve_like_hub_ids(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: calls.append((repo, name)) or "x")
    base.resolve_checkpoint(None, hpsv2.DEFAULT_CHECKPOINT)
    base.resolve_checkpoint("xswu/HPSv2", hpsv2.DEFAULT_CHECKPOINT)
    base.resolve_checkpoint("xswu/HPSv2/HPS_v2_compressed.pt", hpsv2.DEFAULT_CHECKPOINT)
    base.resolve_checkpoint(None, aesthetic.DEFAULT_MLP)  # a file name with '+' in it
    assert calls == [("xswu/HPSv2", "HPS_v2.1_compressed.pt")] * 2 + [("xswu/HPSv2", "HPS_v2_compressed.pt")] + \
        [("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")]
    (tmp_path / "a.pt").write_bytes(b"")
    assert base.resolve_checkpoint(str(tmp_path), "o/n/f.pt") == str(tmp_path / "a.pt")
    (tmp_path / "b.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"exactly one .pt/.pth checkpoint, found \['a.pt', 'b.pth'\]"):
        base.resolve_checkpoint(str(tmp_path), "o/n/f.pt")
    with pytest.raises(ValueError, match="checkpoint 'models/mlp.pth' is not a path that exists"):
        base.resolve_checkpoint("models/mlp.pth", "o/n/f.pt")


# --- aesthetic -----------------------------------------------------------------------------

def save_mlp(path, dim: int, seed: int = 0):
    torch.manual_seed(seed)
    mlp = aesthetic.AestheticMLP(dim).eval()
    torch.save(mlp.state_dict(), path)
    return mlp


def test_aesthetic_is_the_mlp_on_unit_image_embeddings(tiny, tmp_path, images):
    directory, model = tiny
    keys = set(aesthetic.AestheticMLP().state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(directory / name, tmp_path / name)
    mlp = save_mlp(tmp_path / "head.pth", dim=model.config.projection_dim)
    reward = load_reward(f"aesthetic@{tmp_path}")
    with torch.no_grad():
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        features = model.get_image_features(pixel_values=(images - mean) / std)
        features = getattr(features, "pooler_output", features)
        expected = mlp(features / features.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-5)
    assert torch.equal(reward(images, PROMPTS), reward(images, ["x"] * len(PROMPTS)))  # prompts ignored


def test_aesthetic_head_file_with_default_clip(tiny, tmp_path, images, monkeypatch):
    directory, model = tiny
    monkeypatch.setattr(aesthetic, "DEFAULT_CLIP", str(directory))  # stands in for openai/clip-vit-large-patch14
    save_mlp(tmp_path / "mlp.pth", dim=model.config.projection_dim)
    assert load_reward(f"aesthetic@{tmp_path / 'mlp.pth'}")(images, PROMPTS).shape == (len(PROMPTS),)
    save_mlp(tmp_path / "wide.pth", dim=768)
    with pytest.raises(ValueError, match="takes 768-d embeddings but .* projects to 16"):
        load_reward(f"aesthetic@{tmp_path / 'wide.pth'}")
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an improved-aesthetic-predictor state dict"):
        load_reward(f"aesthetic@{tmp_path / 'other.pth'}")


# --- python functions and weighted sums -----------------------------------------------------

def test_python_function_reward(images):
    reward = load_reward("python:reward_fns:brightness")
    assert reward.name == "python:reward_fns:brightness"
    reward.batch_size = 2
    scores = reward(images.double(), PROMPTS)
    assert scores.dtype == torch.float32 and torch.allclose(scores, images.mean(dim=(1, 2, 3)))
    lengths = load_reward("python:reward_fns:prompt_length")(images, PROMPTS)
    assert lengths.tolist() == [float(len(p)) for p in PROMPTS]
    with pytest.raises(ValueError, match="returned 1 scores .* for 5 images"):
        load_reward("python:reward_fns:one_score")(images, PROMPTS)


def test_weighted_sum_is_the_weighted_sum_of_its_terms(tiny, images):
    directory, _ = tiny
    spec = f"clip@{directory}=0.5, python:reward_fns:brightness=-2"
    reward = load_reward(spec)
    assert isinstance(reward, WeightedSum) and reward.name == spec
    total = reward(images, PROMPTS)
    clip = load_reward(f"clip@{directory}")(images, PROMPTS)
    bright = images.mean(dim=(1, 2, 3))
    assert [spec for spec, _, _ in reward.terms] == [f"clip@{directory}", "python:reward_fns:brightness"]
    assert torch.allclose(total, 0.5 * clip - 2 * bright, atol=1e-4)
    assert reward.weights == {f"clip@{directory}": 0.5, "python:reward_fns:brightness": -2.0}
    reward.batch_size = 3
    assert reward.batch_size == 3 and all(r.batch_size == 3 for _, _, r in reward.terms)


def test_hpsv2_runs_vit_h_14s_activation_whatever_the_base_config_omits(hps_dir, tmp_path, images):
    import json

    directory, model = hps_dir
    base = tmp_path / "base"
    shutil.copytree(directory, base)
    config = json.loads((base / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        config[tower].pop("hidden_act", None)  # transformers would default to quick_gelu
    (base / "config.json").write_text(json.dumps(config))
    reward = load_reward(f"hpsv2@{base}")
    logits, scale = reference_logits(model, directory, images, PROMPTS)  # the gelu model
    assert torch.allclose(all_pairs(reward, images, PROMPTS), logits / scale, atol=1e-5)
    config["vision_config"]["hidden_act"] = "quick_gelu"
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(MaskoptError, match="vision_config has hidden_act 'quick_gelu', but HPSv2's ViT-H-14 uses 'gelu'"):
        load_reward(f"hpsv2@{base}")
