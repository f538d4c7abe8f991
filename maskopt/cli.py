"""The `maskopt` command: thin click wrappers, each parsing options and calling one library function.

    maskopt inspect                              # units of the embedded default's U-Net
    maskopt inspect --model stable-diffusion-v1-5/stable-diffusion-v1-5 --targets paper
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import click

from .config import STRATEGIES
from .errors import MaskoptError

MODEL_HELP = ("Hub id or local folder of a diffusers pipeline (or U-Net), or maskopt:default; default: maskopt:default, "
              "the embedded digits pipeline.")


class _UsageError(click.ClickException):
    exit_code = 2  # click's status for bad options, without its usage block: one line


class _Group(click.Group):
    """Bad input becomes a one-line `Error: ...` and exit status 1 (2 for a bad option), not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MaskoptError as e:
            raise click.ClickException(str(e)) from None
        except click.UsageError as e:
            where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            raise _UsageError(e.format_message() + where) from None


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="maskopt")
def main(verbose: int) -> None:
    """Training-free, timestep-specialised masks for diffusion U-Nets."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


@main.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--targets", multiple=True, help="Preset or module-name glob (repeatable); default: every preset.")
@click.option("--groups", type=int, default=None, help="Split each weight unit into this many output-channel groups.")
@click.option("--list", "list_units", is_flag=True, help="Also list every unit by name.")
def inspect(model: str | None, targets: tuple[str, ...], groups: int | None, list_units: bool) -> None:
    """List the maskable units of a pipeline's U-Net, grouped by block, with parameter counts."""
    from .models import EMBEDDED, load_unet
    from .units import KINDS, PRESETS, find_units, masked_params

    model = model or EMBEDDED
    unet = load_unet(model)
    total = sum(p.numel() for p in unet.parameters())
    click.echo(f"U-Net {model}: {total / 1e6:.2f}M parameters")
    selections = [(t, [t]) for t in targets] if targets else [(p, [p]) for p in PRESETS]
    for label, tgt in selections:
        if not targets and not PRESETS[label](unet):  # listing every preset: one this U-Net lacks shows as empty
            click.echo(f"\n{label}: 0 units")
            continue
        units = find_units(unet, tgt, groups=groups)
        n = masked_params(unet, units)
        click.echo(f"\n{label}: {len(units)} units, {n / 1e6:.2f}M masked weights ({100 * n / total:.1f}%)")
        by_block: dict[str, list] = defaultdict(list)
        for u in units:
            by_block[_block_of(u.name)].append(u)
        for block, us in by_block.items():
            kinds = ", ".join(f"{k} {sum(u.kind == k for u in us)}" for k in KINDS if any(u.kind == k for u in us))
            click.echo(f"  {block:<16} {len(us):>4} units  {masked_params(unet, us) / 1e6:8.3f}M  ({kinds})")
            if list_units:
                for u in us:
                    click.echo(f"    {u.key}  [{u.kind}]")


@main.command()
@click.option("--prompts", "prompts", default=None, help="Prompt file, one per line; default: the embedded default's.")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--reward", default=None, help="Reward spec: clip, pickscore, hpsv2, aesthetic, imagereward, digits, "
              "digits-kernel, name@source, python:module:function, or a weighted sum 'imagereward=1,hpsv2=5', which may "
              "hold the set-level terms diversity and frechet (ratios to the baseline's): 'digits=1,diversity=0.2'.")
@click.option("--require", "requires", multiple=True,
              help="A bound on a set-level term, relative to the baseline's: diversity>=0.97, frechet<=1 (repeatable).")
@click.option("--features", default=None, help="Features for the set-level terms (diversity, frechet): digits, or a "
              "CLIP or DINOv2 model; default: digits on the embedded default, else openai/clip-vit-large-patch14.")
@click.option("--reference", default=None, help="Folder of reference images for the frechet term; default: the "
              "embedded default's real held-out digits.")
@click.option("--targets", multiple=True, help="Preset (paper, attention, resnets, branches, freeu) or glob; repeatable.")
@click.option("--init", multiple=True, help="Start from: freeu (FreeU's backbone settings), B1,B2, or a mask file; "
              "repeatable. Evaluated after the baseline.")
@click.option("--space", type=click.Choice(["binary", "gates", "groups"]), default=None)
@click.option("--groups", type=int, default=None, help="Channel groups per layer (groups space; default 4).")
@click.option("--gate-range", default=None, help="Bounds of the gates space, LO:HI (default 0.75:1.25).")
@click.option("--buckets", type=int, default=None, help="Number of timestep buckets K.")
@click.option("--budget", type=int, default=None, help="Evaluations, the baseline included.")
@click.option("--optimizer", default=None, help="nevergrad optimizer name (default per space).")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None,
              help="joint (default): one optimizer over every bucket at once; sweep: one bucket at a time, "
              "first-visited first, about 1.8x the evaluations per minute with trajectory reuse.")
@click.option("--workers", type=int, default=None, help="Candidates asked at once and evaluated together, in one batch.")
@click.option("--seeds", type=int, default=None, help="Seeds per prompt (the same for every candidate).")
@click.option("--steps", type=int, default=None)
@click.option("--guidance", type=float, default=None)
@click.option("--size", default=None, help="Image size HxW (default: the pipeline's).")
@click.option("--scheduler", default=None, help="Sampler name (ddim, dpm++, euler, ...); default: the pipeline's.")
@click.option("--holdout-prompts", default=None, help="Held-out prompt file for validation.")
@click.option("--holdout-seeds", type=int, default=None)
@click.option("--sparsity", type=float, default=None, help="Objective bonus (>0) or penalty (<0) per removed unit.")
@click.option("--batch-size", type=int, default=None, help="Images per candidate per pipeline call (default: all at once; --workers W puts W candidates in each call).")
@click.option("--cache", type=int, default=None, help="Trajectory cache entries; 0 turns reuse off.")
@click.option("--ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Evaluators on Ray: alone, a local instance; auto or ray://HOST:PORT, a cluster (pip install -e \".[ray]\").")
@click.option("--evaluators", type=int, default=None, help="Ray evaluators (default 0: one per GPU with --device cuda, else one per CPU).")
@click.option("--ray-gpus-per-evaluator", type=float, default=None, help="GPUs per Ray evaluator (default 1).")
@click.option("--race/--no-race", default=None, help="Score images in chunks and stop candidates that clearly cannot "
              "beat the best so far (default: on, off when the reward weighs set-level terms).")
@click.option("--race-looks", default=None, help="Shares of the images after which a candidate can stop, e.g. 0.2,0.5 "
              "(default 0.25).")
@click.option("--race-alpha", type=float, default=None,
              help="Nominal chance of stopping a candidate that would beat the best by the margin (default 0.025).")
@click.option("--race-margin", type=float, default=None, help="Indifference zone, in standard deviations of the "
              "baseline's per-image rewards: also stop candidates that would gain less (default 0).")
@click.option("--seed", type=int, default=None, help="Optimizer seed.")
@click.option("--out", default=None, help="Output folder (default: a new runs/search-DATE-TIME).")
@click.option("--recipe", type=click.Path(), default=None, help="YAML file of settings; flags override it.")
@click.option("--resume", is_flag=True, default=None, help="Continue the search journaled in --out.")
@click.option("--device", default=None, help="cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
def search(recipe: str | None, **flags) -> None:
    """Search per-bucket mask values against a reward, without gradients."""
    from tqdm import tqdm

    from .config import resolve
    from .search import Progress, run_search

    cfg = resolve(recipe, **flags)
    bar = None  # made at the first evaluation, so input errors print alone
    shown = {"best": float("-inf"), "hits": 0, "calls": 0, "stopped": 0}  # over this run's evaluations

    def progress(p: Progress) -> None:
        nonlocal bar
        entry = p.entry
        if bar is None:  # in images scored, of the naive total (every candidate on every image)
            bar = tqdm(total=p.images_naive, initial=p.images_done - entry.images, desc="search",
                       unit="img", dynamic_ncols=True)
        if entry.choosable:  # the best a mask file could hold
            shown["best"] = max(shown["best"], entry.reward)
        shown["hits"] += entry.cache_hits
        shown["calls"] += entry.cache_hits + entry.unet_calls
        shown["stopped"] += entry.partial is not None
        bar.update(entry.images)
        # U-Net calls replayed from the trajectory cache so far, of all this run's calls
        bar.set_postfix(evals=f"{entry.i + 1}/{cfg.budget}", best=f"{shown['best']:.4f}",
                        **({"stopped": shown["stopped"]} if cfg.race else {}),
                        **({"evaluators": p.evaluators} if p.evaluators is not None else {}),
                        cache_hits=f"{shown['hits']}/{shown['calls']}", refresh=False)

    try:
        result = run_search(cfg, progress)
    finally:
        if bar is not None:
            bar.close()
    h = result.holdout
    gain = f"held-out gain {h.diff:+.4f} (95% CI {h.ci_low:+.4f} to {h.ci_high:+.4f})" if h.ci_low > 0 else \
        f"no held-out gain ({h.diff:+.4f}, 95% CI {h.ci_low:+.4f} to {h.ci_high:+.4f})"
    click.echo(f"masks: {result.masks_path} ({result.evaluations} evaluations); {gain}; report: {result.out / 'report.md'}")


@contextmanager
def _bar(desc: str, unit: str) -> Iterator[Callable[[int, int], None]]:
    """A progress(done, total) callback whose bar appears at its first call: errors and warnings of loading
    print on lines of their own."""
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


@main.command()
@click.option("--masks", "masks_path", required=True, type=click.Path(), help="Mask file (made by maskopt search).")
@click.option("--model", default=None, help=MODEL_HELP.replace("default:", "default: the mask file's source, else"))
@click.option("--out", required=True, type=click.Path(), help="Output folder (refused if it exists and is not empty).")
@click.option("--onnx", "onnx_", is_flag=True, help="Keep ONNX variants (the default when --trt is not given).")
@click.option("--trt", is_flag=True, help="Build one TensorRT engine per variant (needs TensorRT).")
@click.option("--fp16", is_flag=True, help="float16 weights and compute (inputs and outputs stay float32).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--batch", default="1:1:4", show_default=True, help="Images per call MIN:OPT:MAX (CFG doubles it).")
@click.option("--size", default=None, help="Image side MIN:OPT:MAX in pixels; default: half, one, two x native.")
@click.option("--classifier-free/--no-classifier-free", "classifier_free", default=None,
              help="Profiles for classifier-free guidance (the U-Net batch doubled) or without; default: as the masks "
              "were searched (guidance above 1).")
@click.option("--drop", is_flag=True, help="Skip what the masks remove (smaller, faster variants).")
@click.option("--refit", is_flag=True, help="One refittable engine + one weight set per bucket (with --trt).")
@click.option("--triton", is_flag=True, help="Also write a Triton model repository (triton/).")
@click.option("--triton-instances", type=int, default=4, show_default=True,
              help="Instances of the Triton router: requests it serves at once.")
@click.option("--workspace", type=float, default=None, help="TensorRT builder workspace in GB.")
@click.option("--timing-cache", type=click.Path(), default=None, help="TensorRT timing cache file, shared by builds.")
@click.option("--opt-level", type=int, default=3, show_default=True, help="TensorRT builder optimisation level 0..5.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
def export(masks_path: str, model: str | None, out: str, onnx_: bool, trt: bool, fp16: bool, opset: int, batch: str,
           size: str | None, classifier_free: bool | None, drop: bool, refit: bool, triton: bool,
           triton_instances: int, workspace: float | None, timing_cache: str | None, opt_level: int, force: bool) -> None:
    """Bake each bucket into a U-Net variant: verified ONNX, TensorRT engines, Triton models, manifest.json."""
    from pathlib import Path

    from .export import ExportConfig, Range
    from .export import export as run_export

    cfg = ExportConfig(
        masks=Path(masks_path), out=Path(out), model=model, onnx=onnx_ or not trt, trt=trt, fp16=fp16, opset=opset,
        batch=Range.parse(batch, "--batch"), size=Range.parse(size, "--size") if size else None,
        classifier_free=classifier_free, drop=drop, refit=refit, triton=triton, triton_instances=triton_instances, workspace_gb=workspace,
        timing_cache=Path(timing_cache) if timing_cache else None, optimization_level=opt_level, force=force,
    )
    with _bar("export", "variant") as progress:
        manifest = run_export(cfg, progress=progress)
    kinds = [k for k, on in (("onnx", cfg.onnx), ("plan", trt)) if on]
    worst = max(v.verify["onnx"].max_abs for v in manifest.variants)
    p, s = manifest.profile, manifest.profile.vae_scale
    click.echo(f"{len(manifest.variants)} variants ({'+'.join(kinds)}, {manifest.precision}) in {out}; "
               f"U-Net batch {p.batch.span()}, images {p.height.min * s}x{p.width.min * s} to "
               f"{p.height.max * s}x{p.width.max * s} px; "
               f"max abs error {worst:.2g}; manifest: {Path(out) / 'manifest.json'}"
               + (f"; Triton repository: {Path(out) / 'triton'}" if triton else ""))


@main.command()
@click.option("--prompt", required=True)
@click.option("--masks", "masks_path", type=click.Path(), default=None, help="Mask file (torch backend).")
@click.option("--export", "export_dir", type=click.Path(), default=None, help="Folder made by maskopt export.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt", "triton"]), default=None,
              help="Default: torch with --masks; onnxruntime with --export (tensorrt if it has only engines); "
                   "triton: the U-Net on a Triton server serving the export's triton/ folder (--url).")
@click.option("--url", default=None, help="Triton server for --backend triton: HOST:PORT (HTTP) or grpc://HOST:PORT.")
@click.option("--model", default=None, help=MODEL_HELP.replace("default:", "default: the export's or mask file's, else"))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=None, help="Sampling steps (default: as searched, else 30).")
@click.option("--guidance", type=float, default=None, help="Guidance scale (default: as searched, else 7.5).")
@click.option("--scheduler", default=None, help="Sampler name (ddim, dpm++, ...; default: as searched, else the pipeline's).")
@click.option("--size", default=None, help="Image size HxW in pixels (default: as searched, else the pipeline's).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda for tensorrt, else cpu).")
@click.option("--out", required=True, type=click.Path(), help="Image file to write (.png; .jpg and .webp work too).")
def generate(prompt: str, masks_path: str | None, export_dir: str | None, backend: str | None, model: str | None,
             seed: int, steps: int | None, guidance: float | None, scheduler: str | None, size: str | None,
             device: str | None, url: str | None, out: str) -> None:
    """Generate one image with the masked U-Net: PyTorch, or the exported variants switched by timestep.

    The sampler (steps, guidance, scheduler, size) defaults to the one the masks were searched with.
    """
    from pathlib import Path

    from .generate import GenerateConfig
    from .generate import generate as run_generate
    from .sampler import parse_size

    cfg = GenerateConfig(
        prompt=prompt, out=Path(out), masks=Path(masks_path) if masks_path else None,
        export_dir=Path(export_dir) if export_dir else None, backend=backend, model=model, seed=seed, steps=steps,
        guidance=guidance, scheduler=scheduler, size=parse_size(size), device=device, url=url,
    )
    done = run_generate(cfg)
    click.echo(f"wrote {done.path} (seed {seed}; {done.describe()})")


@main.command("eval")
@click.option("--masks", "masks_paths", multiple=True, required=True, type=click.Path(),
              help="Mask file to judge (repeatable; they must share one U-Net and one sampler).")
@click.option("--prompts", default=None, type=click.Path(), help="Prompt file; default: the first mask file's held-out prompts.")
@click.option("--seeds", type=int, default=10, show_default=True, help="Unseen seeds per prompt (1000, 1001, ...).")
@click.option("--reward", "rewards", multiple=True,
              help="A judge (reward spec; repeatable); default: the searched reward, and digits-kernel on the embedded default.")
@click.option("--freeu", default="grid", show_default=True,
              help="FreeU to compare with: grid (the best of a 6-setting grid, picked on the search prompts x seeds), "
              "default (diffusers' setting for the model family), B1,B2,S1,S2, or none.")
@click.option("--features", default=None,
              help="Features for diversity and the Frechet distance: digits, or a CLIP or DINOv2 model (hub id or folder); "
              "default: digits on the embedded default, else openai/clip-vit-large-patch14.")
@click.option("--reference", type=click.Path(), default=None,
              help="Folder of reference images for the Frechet distance; default: real held-out digits on the embedded default.")
@click.option("--model", default=None, help=MODEL_HELP.replace("default:", "default: the mask files' source, else"))
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--batch-size", type=int, default=0, help="Images per pipeline call (default: all at once).")
@click.option("--out", default=None, help="Output folder (default: a new runs/eval-DATE-TIME).")
@click.option("--force", is_flag=True, help="Write into a non-empty --out.")
def eval_(masks_paths: tuple[str, ...], prompts: str | None, seeds: int, rewards: tuple[str, ...], freeu: str,
          features: str | None, reference: str | None, model: str | None, device: str, batch_size: int,
          out: str | None, force: bool) -> None:
    """Judge mask files against the baseline and FreeU: every judge, diversity and a Frechet distance, with CIs."""
    import time
    from pathlib import Path

    from .comparison import EvalConfig, run_eval

    cfg = EvalConfig(
        masks=tuple(Path(p) for p in masks_paths), out=Path(out or time.strftime("runs/eval-%Y%m%d-%H%M%S")),
        prompts=Path(prompts) if prompts else None, seeds=seeds, rewards=rewards, freeu=freeu, features=features,
        reference=Path(reference) if reference else None, model=model, device=device, batch_size=batch_size,
        force=force,
    )
    with _bar("eval", "evaluation") as progress:
        data = run_eval(cfg, progress)
    judge = data["settings"]["judges"][0]
    last = [r for r in data["conditions"] if r["kind"] == "masks"][-1]
    versus = "vs_freeu" if "vs_freeu" in last["judges"][judge] else "vs_baseline"
    p = last["judges"][judge][versus]
    click.echo(f"{len(data['conditions'])} conditions x {data['settings']['images_per_condition']} images; {last['name']} "
               f"- {'FreeU' if versus == 'vs_freeu' else 'baseline'} on {judge}: {p['diff']:+.4f} (95% CI "
               f"{p['ci_low']:+.4f} to {p['ci_high']:+.4f}); report: {cfg.out / 'report.md'}")


if __name__ == "__main__":
    main()
