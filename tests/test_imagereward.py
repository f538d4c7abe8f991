"""maskopt's ImageReward (transformers' BLIP classes) against ImageReward's own model code, on the same random weights."""

import json

import pytest
import torch

from imagereward_reference import load_reference, source, tiny_reference
from maskopt.errors import MaskoptError
from maskopt.rewards import imagereward, load_reward
from maskopt.rewards.clip import OPENAI_MEAN, OPENAI_STD, Preprocess

PROMPTS = ["a red cat on a mat", "two dogs", "a very long prompt " * 12, "x"]  # the third is cut at 35 tokens
WORDS = "a red cat on mat two dogs very long prompt x the of".split()


@pytest.fixture(scope="module")
def reference():
    package, why = source()
    if package is None:
        pytest.skip(f"ImageReward's model code is not available: {why}")
    return load_reference(package)


def save_tokenizer(folder):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"tok{i}" for i in range(20)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    """A folder as THUDM/ImageReward lays it out: ImageReward.pt (the ImageReward module's state dict, as
    `torch.save(model.state_dict())` writes it), med_config.json, and a (tiny) BERT vocabulary."""
    folder = tmp_path_factory.mktemp("imagereward")
    vocab = len(save_tokenizer(folder)) + 2  # + BLIP's [DEC] and [ENC], as med_config's 30524 = 30522 + 2
    tiny = tiny_reference(reference, vocab_size=vocab)
    torch.save(tiny.model.state_dict(), folder / "ImageReward.pt")
    med = tiny.model.blip.text_encoder.config.to_dict()
    (folder / "med_config.json").write_text(json.dumps(med))
    return folder, tiny


def reference_scores(tiny, folder, images, prompts):
    """ImageReward's score_gard on BLIP's tokenization (init_tokenizer's steps) and ImageReward's preprocessing."""
    tokenizer = save_tokenizer(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    text = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    pixels = Preprocess(size=32, crop=(32, 32), mean=OPENAI_MEAN, std=OPENAI_STD)(images)
    with torch.no_grad():
        return tiny.score(text.input_ids, text.attention_mask, pixels).squeeze(-1)


def test_imagereward_equals_its_reference_code(checkpoint):
    folder, tiny = checkpoint
    images = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    reward = load_reward(f"imagereward@{folder}")
    got = reward(images, PROMPTS)
    want = reference_scores(tiny, folder, images, PROMPTS)
    assert got.shape == (4,) and want.std() > 0.1  # the prompts and images score apart
    assert (got - want).abs().max() < 1e-5, (got, want)
    # the checkpoint file itself as the source, and one image at a time: the same numbers
    alone = load_reward(f"imagereward@{folder / 'ImageReward.pt'}")
    assert torch.allclose(torch.cat([alone(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)]), got, atol=1e-6)


def test_a_swapped_weight_shows(checkpoint, tmp_path):
    """The comparison can fail: q and k of one self-attention swapped in the checkpoint change the scores."""
    folder, tiny = checkpoint
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    base = "blip.text_encoder.encoder.layer.1.attention.self."
    state[base + "query.weight"], state[base + "key.weight"] = state[base + "key.weight"], state[base + "query.weight"]
    for name in ("med_config.json", "vocab.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    torch.save(state, tmp_path / "ImageReward.pt")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    swapped = load_reward(f"imagereward@{tmp_path}")(images, PROMPTS)
    assert (swapped - reference_scores(tiny, folder, images, PROMPTS)).abs().max() > 1e-3


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"blip.itm_head.weight": torch.zeros(2, 64)}), "1 keys map to nothing: blip.itm_head.weight"),
    (lambda s: s.pop("blip.text_encoder.encoder.layer.0.output.dense.bias"),
     "text encoder: 1 unfilled (encoder.layer.0.output.dense.bias)"),
    (lambda s: s.update({"mlp.layers.0.weight": torch.zeros(3, 3)}), "MLP head"),
])
def test_a_checkpoint_that_does_not_map_fully_is_refused(checkpoint, tmp_path, change, message):
    folder, _ = checkpoint
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    change(state)
    for name in ("med_config.json", "vocab.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(MaskoptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_reward(f"imagereward@{tmp_path}")


def test_the_vit_is_read_off_the_checkpoint(checkpoint):
    folder, tiny = checkpoint
    vision, _, _ = imagereward.split_checkpoint(torch.load(folder / "ImageReward.pt", weights_only=True))
    config = imagereward.vision_config(vision)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size,
            config.patch_size, config.layer_norm_eps) == (128, 2, 2, 32, 16, 1e-6)


class NotATensor:  # a pickled object: torch.load(weights_only=True) refuses to build it
    pass


def test_a_checkpoint_that_needs_more_than_tensors_is_refused(tmp_path):
    torch.save({"model": NotATensor()}, tmp_path / "ImageReward.pt")
    with pytest.raises(MaskoptError, match=r"ImageReward checkpoint .*ImageReward.pt cannot be loaded as plain tensors"):
        load_reward(f"imagereward@{tmp_path}")
    (tmp_path / "ImageReward.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MaskoptError, match="cannot be loaded as plain tensors"):
        load_reward(f"imagereward@{tmp_path}")


def _snapshot(hub, repo):
    """An empty snapshot folder of `repo` in a Hugging Face cache at `hub`, as hf_hub_download lays it out."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    return folder / "snapshots" / commit


def test_the_paper_recipe_loads_both_rewards_by_their_hub_ids(checkpoint, tmp_path):
    """recipes/sd15-paper.yaml's reward, imagereward=1,hpsv2=5, by the hub ids users load (THUDM/ImageReward,
    bert-base-uncased, xswu/HPSv2, laion's ViT-H-14 config), served offline from a cache of tiny stand-ins."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tiny_clip import save_tiny_clip, to_open_clip

    folder, tiny = checkpoint
    hub = tmp_path / "hf" / "hub"
    ir = _snapshot(hub, "THUDM/ImageReward")
    for name in ("ImageReward.pt", "med_config.json"):
        (ir / name).write_bytes((folder / name).read_bytes())
    bert = _snapshot(hub, "bert-base-uncased")
    (bert / "vocab.txt").write_bytes((folder / "vocab.txt").read_bytes())
    (bert / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    laion = _snapshot(hub, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    clip = save_tiny_clip(laion, seed=3, weights=False)
    state = {f"module.{k}": v.half() for k, v in to_open_clip(clip.state_dict()).items()}
    torch.save({"epoch": 1, "state_dict": state}, _snapshot(hub, "xswu/HPSv2") / "HPS_v2.1_compressed.pt")
    recipe = Path(__file__).parents[1] / "recipes" / "sd15-paper.yaml"
    script = (
        "import json, sys, torch\n"
        "from maskopt.config import load_recipe\n"
        "from maskopt.rewards import load_reward\n"
        "spec = load_recipe(sys.argv[1])['reward']\n"
        "reward = load_reward(spec)\n"
        "images = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(0))\n"
        "prompts = json.loads(sys.argv[2])\n"
        "scores = reward(images, prompts)\n"
        "print(json.dumps({'spec': spec, 'scores': scores.tolist(), "
        "'terms': {s: r(images, prompts).tolist() for s, _, r in reward.terms}}))\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script, str(recipe), json.dumps(PROMPTS)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["spec"] == "imagereward=1,hpsv2=5" and sorted(out["terms"]) == ["hpsv2", "imagereward"]
    images = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    # ImageReward by its hub id: the reference code's scores; the sum: 1 x ImageReward + 5 x HPSv2
    assert (torch.tensor(out["terms"]["imagereward"]) - reference_scores(tiny, folder, images, PROMPTS)).abs().max() < 1e-5
    want = torch.tensor(out["terms"]["imagereward"]) + 5 * torch.tensor(out["terms"]["hpsv2"])
    assert torch.allclose(torch.tensor(out["scores"]), want, atol=1e-5)
    assert torch.tensor(out["terms"]["hpsv2"]).abs().max() > 0
