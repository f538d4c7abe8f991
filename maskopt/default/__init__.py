"""The embedded default: a small, real, text-conditioned diffusion pipeline and its reward.

Everything here ships inside the package, so the whole loop runs on a laptop with no hub
access. All of it is trained from scratch on scikit-learn's handwritten digits by
``scripts/train_default.py`` (fixed seeds; settings and measured numbers in its docstring):

    >>> from diffusers import DiffusionPipeline
    >>> from maskopt.default import PIPELINE_DIR, PROMPTS_PATH
    >>> from maskopt.default.reward import DigitReward
    >>> pipe = DiffusionPipeline.from_pretrained(PIPELINE_DIR)   # a StableDiffusionPipeline, 32x32
    >>> pipe.set_progress_bar_config(disable=True)
    >>> prompts = PROMPTS_PATH.read_text().splitlines()
    >>> images = pipe(prompts[:4], num_inference_steps=15, guidance_scale=1.0, output_type="pt").images
    >>> images.shape
    torch.Size([4, 3, 32, 32])
    >>> DigitReward()(images, prompts[:4]).shape               # P(prompted digit) per image
    torch.Size([4])

- ``PIPELINE_DIR``: a ``StableDiffusionPipeline`` saved with ``save_pretrained`` (AutoencoderKL
  32x32x3 <-> 8x8x4, a 2-layer CLIPTextModel with a word-level CLIPTokenizer, a
  UNet2DConditionModel with cross-attention, a DDIM scheduler); no safety checker.
- ``CLASSIFIER_PATH``: the reward's digit CNN (``maskopt.default.classifier``).
- ``PROMPTS_PATH``: the prompts a search scores against, one per line, all ten digits.
- ``HOLDOUT_PROMPTS_PATH``: other phrasings of all ten digits, for checking that a found
  mask generalises beyond the search prompts.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

PIPELINE_DIR = _HERE / "pipeline"
CLASSIFIER_PATH = _HERE / "classifier.safetensors"
PROMPTS_PATH = _HERE / "prompts.txt"
HOLDOUT_PROMPTS_PATH = _HERE / "holdout_prompts.txt"
RECIPE_PATH = _HERE / "recipe.yaml"  # the search settings `maskopt search` uses without --model/--recipe

__all__ = ["PIPELINE_DIR", "CLASSIFIER_PATH", "PROMPTS_PATH", "HOLDOUT_PROMPTS_PATH", "RECIPE_PATH"]
