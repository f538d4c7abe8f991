"""Train maskopt's embedded default from scratch: the digits pipeline and its reward classifier.

    python scripts/train_default.py                     # writes maskopt/default/{pipeline/, classifier.safetensors}
    python scripts/train_default.py --out /tmp/d --quick  # a 1-minute smoke run of every stage
    python scripts/train_default.py --reuse classifier,vae   # retrain only the text encoder + U-Net

Everything is trained on scikit-learn's digits (``maskopt.default.data``: 60% diffusion /
20% classifier / 20% held out, stratified, seed 0), upsampled bilinearly to 32x32 grey RGB.
Stages, each with its own fixed seed (``--seed``, default 0, offset per stage):

1. Classifier (``maskopt.default.classifier``): 600 AdamW steps, batch 128, lr 2e-3 (5% warm-up,
   cosine to 10%), random affine (+-12 deg, +-10% scale, +-2 px) and noise augmentation, on the
   ``classifier`` split only. Label smoothing 0.05 keeps its probabilities graded (real held-out
   digits average 0.947, not 1.0), so the reward still separates a clear digit from a clearer one.
2. AutoencoderKL 32x32x3 <-> 8x8x4 (blocks 16/32/64, one resnet per block, mid attention):
   800 AdamW steps, batch 64, lr 1e-3 (5% warm-up, cosine to 10%), loss L1 + MSE + 1e-5 * KL
   (per element), on the ``diffusion`` split. scaling_factor = 1 / std of the split's sampled
   latents, as SD does.
3. Text encoder + U-Net, trained jointly on the VAE's latents with epsilon-prediction MSE
   under SD1.5's noise schedule (1000 steps, scaled_linear 0.00085..0.012): 2500 AdamW steps,
   batch 128, lr 2e-3 (100 warm-up steps, cosine to 10%), weight decay 0.01, grad clip 1.0,
   EMA 0.999 (saved weights are the EMA). Each image gets a caption drawn from a small
   grammar ("a handwritten 7", "the digit seven", "a sketch of the number 7 drawn by hand"
   ...), or "" with probability 0.1 for classifier-free guidance.
   - CLIPTextModel: 2 layers, width 32, 4 heads, 16 positions, a word-level CLIPTokenizer
     whose vocabulary and merges are built here (no hub files). It is trained jointly, not
     frozen at random: SD's encoder arrives knowing that "7" and "seven" mean the same and
     that "photo of a" carries no digit; from scratch, the only way to learn that is from
     the captions, and a frozen random encoder would leave every phrasing an unrelated code.
   - UNet2DConditionModel: blocks 32/64/64, one layer per block, CrossAttnDown x2 + Down,
     Up + CrossAttnUp x2, 4 heads, cross_attention_dim 32, sample_size 8 (so 32x32 images).
4. Saved as a StableDiffusionPipeline (DDIM scheduler, no safety checker), then scored:
   every search prompt x 2 seeds, DDIM 15 steps, guidance 1.0 and 3.0.

Measured on 2 CPU cores shared with other jobs (torch 2.13.0, diffusers 0.42.1,
transformers 5.24.0) on 2026-11-26. The shipped files come from two runs with these same
settings: the classifier from a plain run that was then stopped (the machine was
overloaded), everything else from ``--reuse classifier``.

    classifier  600 steps in 41 s; final loss 0.348 (label-smoothed); held-out accuracy 0.9889 (356/360)
    vae         800 steps in 1210 s (0.31 s/step when the machine was quiet, 1.6-3 s/step when not);
                final L1+MSE 0.0113, KL 8.2 per element; held-out reconstruction MSE 0.00040
                in [-1, 1] units; scaling_factor 0.3074
    unet        2500 steps in 1610 s (0.35-0.4 s/step quiet); 1.466M U-Net + 0.032M text
                encoder parameters; loss (running mean) 0.341 at step 100, 0.070 at 400,
                0.040 at 1500, 0.035 at 2500
    samples     30 search prompts x 2 seeds, DDIM 15: reward 0.955 / Frechet 16.9 at guidance
                1.0, 0.982 / 19.1 at guidance 3.0 (60 images; Frechet is biased up at small N)

On a quiet machine the whole run takes about 20 minutes.

Seeds are fixed, but results are reproducible only up to float non-associativity across
CPUs and thread counts.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from maskopt.default import HOLDOUT_PROMPTS_PATH, PROMPTS_PATH
from maskopt.default.classifier import DigitClassifier
from maskopt.default.data import DIGIT_WORDS, load_split

logger = logging.getLogger("train_default")

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Config:
    out: str = str(REPO / "maskopt" / "default")
    seed: int = 0
    threads: int = 2
    # classifier
    clf_steps: int = 600
    clf_batch: int = 128
    clf_lr: float = 2e-3
    # autoencoder
    vae_steps: int = 800
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    # text encoder + U-Net
    unet_steps: int = 2500
    unet_batch: int = 128
    unet_lr: float = 2e-3
    unet_warmup: int = 100
    null_prompt_prob: float = 0.1
    ema_decay: float = 0.999
    eval_seeds: int = 2
    # Stages to load from `out` instead of training ("classifier", "vae", comma-separated): a run cut
    # short by a busy machine resumes without repeating the stages it finished.
    reuse: str = ""
    quick: bool = False  # every stage a few steps, for checking the script, not for shipping


# ---------------------------------------------------------------- captions and tokenizer

ARTICLES = ("a", "an", "the")
ADJECTIVES = ("handwritten", "written", "hand-drawn", "simple", "single", "small", "neat", "clean")
NOUNS = ("digit", "number", "numeral")
MEDIA = ("image", "photo", "picture", "drawing", "sketch", "scan")
SUFFIXES = ("written by hand", "drawn by hand", "on a black background", "in white")
# Every word any caption or prompt file may use; the tokenizer has one token for each.
WORDS = sorted(
    {w for phrase in ARTICLES + ADJECTIVES + NOUNS + MEDIA + SUFFIXES for w in phrase.replace("-", " ").split()}
    | {"of"} | set(DIGIT_WORDS)
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou8" and not word.startswith("one") else "a"


def caption(digit: int, rng: random.Random) -> str:
    """One random phrasing of a digit; the branches cover the shapes users write prompts in."""
    text = str(digit) if rng.random() < 0.5 else DIGIT_WORDS[digit]
    if rng.random() < 0.6:
        text = f"{rng.choice(NOUNS)} {text}"  # "digit 7"
    if rng.random() < 0.5:
        text = f"{rng.choice(ADJECTIVES)} {text}"  # "handwritten digit 7"
    if rng.random() < 0.75:
        text = f"{rng.choice(('the', _article(text)))} {text}"  # "a handwritten digit 7"
    if rng.random() < 0.3:
        medium = rng.choice(MEDIA)
        text = f"{_article(medium)} {medium} of {text}"  # "a photo of a handwritten digit 7"
    if rng.random() < 0.2:
        text = f"{text} {rng.choice(SUFFIXES)}"
    return text


def train_bpe(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that build every word into one token: merge the most frequent pair until none is left.

    Applying merges in rank order reproduces training's segmentation on the training words, so
    each word becomes exactly one token (checked by the caller, not assumed).
    """
    seqs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges = []
    while True:
        counts = collections.Counter(p for s in seqs.values() for p in zip(s, s[1:]))
        if not counts:
            return merges
        pair = max(counts, key=lambda p: (counts[p], p))  # ties broken by the pair itself: deterministic
        merges.append(pair)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = tuple(out)


def build_tokenizer(max_length: int = 16):
    """A word-level CLIPTokenizer: specials, single characters (so nothing is ever dropped), whole words."""
    from transformers import CLIPTokenizer

    merges = train_bpe([w for w in WORDS if w.isalpha()])
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789-,.'":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    for word in WORDS + [str(i) for i in range(10)] + ["-"]:
        tokens = tokenizer.tokenize(word)
        if len(tokens) != 1 and word.isalnum():
            raise RuntimeError(f"tokenizer splits {word!r} into {tokens}")
    return tokenizer, vocab, merges


def check_prompt_files(tokenizer) -> None:
    """Every word of the shipped prompt files must be a whole token the text encoder trained on."""
    for path in (PROMPTS_PATH, HOLDOUT_PROMPTS_PATH):
        for line in path.read_text().splitlines():
            tokens = tokenizer.tokenize(line)
            unknown = [t for t in tokens if not t.endswith("</w>")]
            if unknown or len(tokenizer(line).input_ids) > tokenizer.model_max_length:
                raise RuntimeError(f"{path.name}: {line!r} has words outside the vocabulary or is too long: {tokens}")


def save_tokenizer_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    # transformers 5 saves tokenizer.json only; vocab.json + merges.txt also let 4.x's CLIPTokenizer load it.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


# ---------------------------------------------------------------- schedules and helpers

def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random rotation, scale, shift and noise: the classifier must read any plausible digit, not the split's."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(12)
    scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.12  # +-2 px at 32x32
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    x = x + 0.05 * torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g)
    return x.clamp(0, 1)


class EMA:
    """Exponential moving average of parameters, with the usual warm-up so early steps do not dominate."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay, self.steps = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p, 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


# ---------------------------------------------------------------- stages

def train_classifier(cfg: Config) -> DigitClassifier:
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = load_split("classifier")
    x_held, y_held = load_split("holdout")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clf_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.clf_steps, cfg.clf_steps // 20))
    for step in range(cfg.clf_steps):
        i = torch.randint(0, len(x), (cfg.clf_batch,), generator=g)
        loss = F.cross_entropy(model(augment(x[i], g)), y[i], label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.clf_steps - 1:
            logger.info("classifier step %d loss %.4f", step, loss.item())
    model.eval()
    with torch.no_grad():
        acc = (model(x_held).argmax(1) == y_held).float().mean().item()
    logger.info("classifier held-out accuracy %.4f (%d digits)", acc, len(y_held))
    return model


def train_vae(cfg: Config):
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed + 1)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = load_split("diffusion")[0] * 2 - 1  # SD's VAEs work in [-1, 1]
    x_held = load_split("holdout")[0] * 2 - 1
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=16,
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.vae_steps, cfg.vae_steps // 20))
    for step in range(cfg.vae_steps):
        batch = x[torch.randint(0, len(x), (cfg.vae_batch,), generator=g)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        rec = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
        kl = posterior.kl().mean() / (4 * 8 * 8)  # per latent element, like the per-pixel reconstruction
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            logger.info("vae step %d rec %.4f kl %.2f", step, rec.item(), kl.item())
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.sample(generator=g)
        scaling = 1.0 / latents.std().item()
        vae.register_to_config(scaling_factor=scaling)
        recon = vae.decode(vae.encode(x_held).latent_dist.mode()).sample
    logger.info("vae held-out reconstruction MSE %.5f ([-1, 1] units); scaling_factor %.4f",
                F.mse_loss(recon, x_held).item(), scaling)
    return vae


def train_unet(cfg: Config, vae, tokenizer):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed + 2)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    rng = random.Random(cfg.seed + 2)
    x, labels = load_split("diffusion")
    with torch.no_grad():
        posterior = vae.encode(x * 2 - 1).latent_dist
    mean, std = posterior.mean, posterior.std  # (N, 4, 8, 8): sampled afresh each step, as SD's training does
    scaling = vae.config.scaling_factor

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, projection_dim=32,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=4,
        cross_attention_dim=32, norm_num_groups=32,
    )
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    logger.info("unet %.3fM params, text encoder %.3fM params",
                sum(p.numel() for p in unet.parameters()) / 1e6,
                sum(p.numel() for p in text_encoder.parameters()) / 1e6)
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.unet_steps, cfg.unet_warmup))
    ema = EMA(params, cfg.ema_decay)
    running, start = None, time.time()
    for step in range(cfg.unet_steps):
        i = torch.randint(0, len(x), (cfg.unet_batch,), generator=g)
        latents = (mean[i] + std[i] * torch.randn(mean[i].shape, generator=g)) * scaling
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        noisy = noise_sched.add_noise(latents, noise, t)
        prompts = ["" if rng.random() < cfg.null_prompt_prob else caption(int(d), rng) for d in labels[i]]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        cond = text_encoder(ids)[0]  # (B, 16, 32), what the pipeline feeds cross-attention
        loss = F.mse_loss(unet(noisy, t, cond).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            logger.info("unet step %d loss %.4f (running %.4f) %.0fs", step, loss.item(), running, time.time() - start)
    ema.copy_to_params()
    return unet.eval(), text_encoder.eval(), noise_sched


def evaluate(pipe, cfg: Config) -> dict:
    from maskopt.default.reward import DigitReward, frechet_distance

    reward = DigitReward(Path(cfg.out) / "classifier.safetensors")
    prompts = PROMPTS_PATH.read_text().splitlines() * cfg.eval_seeds
    seeds = [s for s in range(cfg.eval_seeds) for _ in range(len(prompts) // cfg.eval_seeds)]
    results = {}
    for guidance in (1.0, 3.0):
        start = time.time()
        images = pipe(prompts, num_inference_steps=15, guidance_scale=guidance, output_type="pt",
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        seconds = (time.time() - start) / len(prompts)
        score = reward(images, prompts).mean().item()
        fid = frechet_distance(images, reward=reward)
        results[f"ddim15_cfg{guidance}"] = {"reward": round(score, 4), "frechet": round(fid, 3), "s_per_image": round(seconds, 4)}
        logger.info("DDIM 15 steps, guidance %.1f: reward %.4f, Frechet %.3f, %.4f s/image", guidance, score, fid, seconds)
    return results


def main(cfg: Config) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab, merges = build_tokenizer()
    check_prompt_files(tokenizer)
    times = {}

    reuse = {s for s in cfg.reuse.split(",") if s}
    if reuse - {"classifier", "vae"}:
        raise ValueError(f"--reuse takes 'classifier' and/or 'vae', got {cfg.reuse!r}")

    start = time.time()
    if "classifier" not in reuse:
        classifier = train_classifier(cfg)
        save_file(classifier.state_dict(), str(out / "classifier.safetensors"))
    times["classifier"] = time.time() - start

    start = time.time()
    if "vae" in reuse:
        vae = AutoencoderKL.from_pretrained(out / "pipeline" / "vae").eval()
    else:
        vae = train_vae(cfg)
        vae.save_pretrained(out / "pipeline" / "vae")  # saved now, so that --reuse vae can pick it up
    times["vae"] = time.time() - start

    start = time.time()
    unet, text_encoder, noise_sched = train_unet(cfg, vae, tokenizer)
    times["unet"] = time.time() - start

    # SD1.5's DDIM settings: same betas as training, "leading" spacing, steps_offset 1.
    scheduler = DDIMScheduler.from_config(noise_sched.config, set_alpha_to_one=False, steps_offset=1,
                                          timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    save_tokenizer_files(out / "pipeline" / "tokenizer", vocab, merges)
    for path in out.rglob("*"):  # safetensors writes 0600; a package installed as root must stay readable
        if path.is_file():
            path.chmod(0o644)

    start = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")  # score what ships, not what is in memory
    pipe.set_progress_bar_config(disable=True)
    results = evaluate(pipe, cfg)
    times["samples"] = time.time() - start
    logger.info("times (s): %s; config: %s", {k: round(v) for k, v in times.items()}, json.dumps(asdict(cfg)))
    logger.info("results: %s", json.dumps(results))


def parse_args() -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Config):
        if f.type == "bool" or isinstance(f.default, bool):
            parser.add_argument(f"--{f.name}", action="store_true", default=f.default)
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    cfg = Config(**vars(parser.parse_args()))
    if cfg.quick and Path(cfg.out).resolve() == Path(Config.out).resolve():
        parser.error("--quick would overwrite the shipped default; give --out a scratch folder")
    if cfg.quick:
        cfg.clf_steps, cfg.vae_steps, cfg.unet_steps, cfg.unet_warmup, cfg.eval_seeds = 20, 20, 20, 5, 1
    return cfg


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main(parse_args())
