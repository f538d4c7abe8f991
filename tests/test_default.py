"""The embedded default loads from the package's own files and its reward measures what it claims."""

import numpy as np
import pytest
import torch

from maskopt.default import CLASSIFIER_PATH, HOLDOUT_PROMPTS_PATH, PIPELINE_DIR, PROMPTS_PATH
from maskopt.default.data import _split_indices, load_split
from maskopt.default.reward import DigitReward, digit_of, frechet_distance


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(PIPELINE_DIR))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reward():
    return DigitReward()


@pytest.fixture(scope="module")
def holdout():
    return load_split("holdout")


def _prompts(path):
    return path.read_text().splitlines()


def test_pipeline_is_a_stable_diffusion_pipeline(pipe):
    from diffusers import StableDiffusionPipeline

    assert type(pipe) is StableDiffusionPipeline
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert all(p.suffix == ".safetensors" for p in PIPELINE_DIR.rglob("*") if p.suffix in (".safetensors", ".bin"))
    # The paper preset's units exist: cross-attention (attn2) linears in the decoder.
    names = [n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(n.startswith("up_blocks.") and ".attn2.to_k" in n for n in names)


def test_pipeline_denoises(pipe):
    prompts = ["a handwritten 7", "the digit seven"]
    images = pipe(prompts, num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in range(2)]).images
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_tokenizer_knows_every_prompt_word(pipe):
    from transformers import CLIPTokenizer

    # The same vocabulary from vocab.json + merges.txt, the files transformers 4.x's CLIPTokenizer reads.
    files = CLIPTokenizer(vocab=str(PIPELINE_DIR / "tokenizer" / "vocab.json"),
                          merges=str(PIPELINE_DIR / "tokenizer" / "merges.txt"), model_max_length=16)
    for prompt in _prompts(PROMPTS_PATH) + _prompts(HOLDOUT_PROMPTS_PATH):
        tokens = pipe.tokenizer.tokenize(prompt)
        assert all(t.endswith("</w>") for t in tokens), (prompt, tokens)  # whole words, never spelled out
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=16).input_ids
        assert len(ids) == 16 and ids == files(prompt, padding="max_length", max_length=16).input_ids


def test_prompt_files_cover_every_digit():
    for path in (PROMPTS_PATH, HOLDOUT_PROMPTS_PATH):
        prompts = _prompts(path)
        assert sorted({digit_of(p) for p in prompts}) == list(range(10)), path.name
    assert not set(_prompts(PROMPTS_PATH)) & set(_prompts(HOLDOUT_PROMPTS_PATH))


def test_digit_of():
    assert digit_of("a handwritten 7") == 7
    assert digit_of("The digit SEVEN") == 7
    assert digit_of("zero") == 0
    with pytest.raises(ValueError, match="'a cat'"):
        digit_of("a cat")
    with pytest.raises(ValueError, match="several digits"):
        digit_of("a 7 next to an eight")


def test_splits_are_disjoint():
    parts = _split_indices()
    joined = np.concatenate(list(parts.values()))
    assert len(joined) == len(set(joined.tolist())) == 1797


def test_classifier_held_out_accuracy(reward, holdout):
    images, labels = holdout
    accuracy = (reward.logits(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95


def test_reward_prefers_the_prompted_digit(reward, holdout):
    images, labels = holdout
    right = reward(images, [f"a handwritten {d}" for d in labels.tolist()])
    wrong = reward(images, [f"the digit {(d + 1) % 10}" for d in labels.tolist()])
    assert right.shape == (len(labels),) and right.dtype == torch.float32
    assert right.mean() > 0.9 and wrong.mean() < 0.05
    assert (right > wrong).float().mean() > 0.95
    # Any resolution: the same digits at 64x64 score about the same.
    big = torch.nn.functional.interpolate(images[:50], size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(reward(big, ["a 0"] * 50), reward(images[:50], ["a 0"] * 50), atol=0.1)


def test_reward_from_explicit_path():
    reward = DigitReward(str(CLASSIFIER_PATH))
    assert reward.name == "digits"
    with pytest.raises(FileNotFoundError):
        DigitReward("/nonexistent/classifier.safetensors")


def test_frechet_distance(holdout):
    images, _ = holdout
    assert frechet_distance(images, images) < 1e-6
    assert frechet_distance(images) < 1e-6  # the default reference is the held-out split itself
    real = frechet_distance(load_split("classifier")[0])  # other real digits: small but not zero
    noise = frechet_distance(torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert 0 < real and noise > 10 * real


def test_short_search_on_the_default_records_what_it_found(readme_run, pipe):
    """`maskopt search --budget 20` (the README's first steps) runs the shipped pipeline and reward with the shipped
    recipe; the mask file holds the best journaled candidate, and evaluating it again gives its search reward."""
    import json

    from maskopt import MaskSet
    from maskopt.scoring import Evaluator
    from maskopt.prompts import read_prompts

    out = readme_run[0] / "runs" / "first"
    header, *entries = (json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines())
    assert header["reward"] == "digits" and header["config"]["guidance"] == 1.0 and len(entries) == 20
    masks = MaskSet.load(out / "masks.json", unet=pipe.unet)
    # the embedded recipe: channel groups of the 32 paper units, searched by the groups space's default optimizer
    assert masks.provenance["space"] == "groups" and masks.provenance["optimizer"] == "DiscreteOnePlusOne"
    assert masks.provenance["optimizer_runs"] == "DiscreteOnePlusOne" and len(masks.units) == 4 * 32
    # the mask file is the best journaled candidate, and a fresh evaluation of it reproduces its search reward
    best = max(entries, key=lambda e: e["objective"])
    assert np.array_equal(masks.values, np.asarray(best["values"])) and masks.provenance["best_evaluation"] == best["i"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as the search ran (tests/readme.py): the same sums in the same order
    try:
        again = Evaluator(pipe, DigitReward(), masks, read_prompts(PROMPTS_PATH), range(2), 15, 1.0)(masks.values)
    finally:
        torch.set_num_threads(threads)
    # the search scored it in a raced group of 4 (chunks, one batch under per_sample): equal to float rounding
    assert masks.provenance["search_reward"] == best["reward"] and "partial" not in best
    assert again.reward == pytest.approx(best["reward"], abs=1e-6) and again.reward != 0.0
    assert masks.sampler.describe() == "ddim, 15 steps, guidance 1, 32x32"


def test_the_optimizer_ngopt_picks_is_kept_and_reported(tmp_path):
    from click.testing import CliRunner

    from maskopt.cli import main
    from maskopt.maskset import MaskSet

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["search", "--space", "gates", "--budget", "4", "--seeds", "1", "--holdout-seeds", "1",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    prov = MaskSet.load(out / "masks.json").provenance
    assert prov["optimizer"] == "NGOpt" and prov["optimizer_runs"] not in ("", "NGOpt")
    assert f"optimizer: `NGOpt` (runs {prov['optimizer_runs']})" in (out / "report.md").read_text()


def test_prompts_without_a_digit_are_refused_before_loading(tmp_path):
    """The digits reward scores the digit a prompt names: a prompt naming none fails at once, in one line."""
    from click.testing import CliRunner

    from maskopt.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten 3\na photo of a cat\n")
    r = CliRunner().invoke(main, ["search", "--prompts", str(prompts), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"Error: prompt file {prompts}: prompt 'a photo of a cat' names no digit (0-9 or zero..nine) "
        "(the digits reward needs one digit per prompt)"]
    assert not (tmp_path / "run").exists()


def test_a_bad_flag_is_not_blamed_on_the_embedded_recipe(tmp_path):
    from click.testing import CliRunner

    from maskopt.cli import main

    r = CliRunner().invoke(main, ["search", "--size", "0x0", "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and r.output.strip() == (
        "Error: size 0x0: height and width must be positive multiples of 8, e.g. 512x512")


def test_the_second_judge_is_another_model_that_reads_digits(holdout):
    """digits-kernel: a kernel machine on 8x8 pixels, trained on the diffusion split; its torch inference is
    scikit-learn's own Nystroem + LogisticRegression on the shipped arrays, and it reads real digits as well."""
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import LogisticRegression

    from maskopt.default.judge import KernelJudge, pixels
    from maskopt.rewards import load_reward

    judge = load_reward("digits-kernel")
    assert isinstance(judge, KernelJudge)
    images, labels = holdout
    kernel = Nystroem(kernel="rbf", gamma=judge.gamma, n_components=len(judge.landmarks))
    kernel.components_, kernel.normalization_ = judge.landmarks.numpy(), judge.normalization.numpy()
    kernel.component_indices_ = np.arange(len(judge.landmarks))
    logistic = LogisticRegression()
    logistic.coef_, logistic.intercept_, logistic.classes_ = judge.coef.numpy(), judge.intercept.numpy(), np.arange(10)
    want = logistic.predict_proba(kernel.transform(pixels(images).numpy()))
    assert np.abs(judge.probabilities(images).numpy() - want).max() < 1e-6
    assert (want.argmax(1) == labels.numpy()).mean() >= 0.98
    prompts = [f"the digit {d}" for d in labels.tolist()]
    assert torch.allclose(judge(images, prompts), torch.from_numpy(want[np.arange(len(labels)), labels.numpy()]).float())
    with pytest.raises(ValueError, match="names no digit"):
        judge(images[:1], ["a cat"])
