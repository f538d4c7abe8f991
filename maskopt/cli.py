"""The `maskopt` command: thin click wrappers, each parsing options and calling one library function.

    maskopt inspect                              # units of the embedded default's U-Net
    maskopt inspect --model runwayml/stable-diffusion-v1-5 --targets paper
"""

from __future__ import annotations

import logging
from collections import defaultdict

import click

from .errors import MaskoptError

MODEL_HELP = "Hub id or local folder of a diffusers pipeline (or U-Net); default: the embedded digits pipeline."


class _Group(click.Group):
    """Bad input becomes a one-line `Error: ...` and exit status 1, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MaskoptError as e:
            raise click.ClickException(str(e)) from None


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
    from .models import load_unet
    from .units import PRESETS, find_units, masked_params

    unet = load_unet(model)
    total = sum(p.numel() for p in unet.parameters())
    click.echo(f"U-Net {unet.config._name_or_path or model}: {total / 1e6:.2f}M parameters")
    selections = [(t, [t]) for t in targets] if targets else [(p, [p]) for p in PRESETS]
    for label, tgt in selections:
        units = find_units(unet, tgt, groups=groups)
        n = masked_params(unet, units)
        click.echo(f"\n{label}: {len(units)} units, {n / 1e6:.2f}M masked weights ({100 * n / total:.1f}%)")
        by_block: dict[str, list] = defaultdict(list)
        for u in units:
            by_block[_block_of(u.name)].append(u)
        for block, us in by_block.items():
            kinds = ", ".join(f"{k} {sum(u.kind == k for u in us)}" for k in ("weight", "group", "branch") if any(u.kind == k for u in us))
            click.echo(f"  {block:<16} {len(us):>4} units  {masked_params(unet, us) / 1e6:8.3f}M  ({kinds})")
            if list_units:
                for u in us:
                    click.echo(f"    {u.key}  [{u.kind}]")


if __name__ == "__main__":
    main()
