from click.testing import CliRunner

from maskopt.cli import main
from tiny import SD15, tiny_unet


def test_inspect_saved_unet_folder(tmp_path, unet):
    unet.save_pretrained(tmp_path / "unet")
    r = CliRunner().invoke(main, ["inspect", "--model", str(tmp_path / "unet")])
    assert r.exit_code == 0, r.output
    assert "paper: 16 units" in r.output and "resnets: 8 units" in r.output
    assert "up_blocks.1" in r.output


def test_inspect_pipeline_layout_and_targets(tmp_path, unet):
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    r = CliRunner().invoke(main, ["inspect", "--model", str(tmp_path / "pipe"), "--targets", "up_blocks.1.attentions.0.*.to_q", "--groups", "2", "--list"])
    assert r.exit_code == 0, r.output
    assert "4 units" in r.output and "#1/2" in r.output


def test_inspect_bad_inputs(tmp_path, unet):
    r = CliRunner().invoke(main, ["inspect", "--model", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "is not a path that exists, nor a hub id" in r.output
    unet.save_pretrained(tmp_path / "unet")
    r = CliRunner().invoke(main, ["inspect", "--model", str(tmp_path / "unet"), "--targets", "nope.*"])
    assert r.exit_code != 0 and "'nope.*' matches no unit" in r.output
    assert len(r.output.strip().splitlines()) <= 2  # header + one-line error, no traceback


def test_hub_id_not_cached_offline_is_one_line(tmp_path):
    """A hub id that is neither cached nor reachable: one line saying so, whatever diffusers logs on the way."""
    import os
    import subprocess
    import sys

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),  # an empty cache, no network
           "PYTHONPATH": os.path.dirname(__file__)}
    r = subprocess.run([sys.executable, "-m", "maskopt.cli", "search", "--model", "someorg/not-cached", "--prompts",
                        str(prompts), "--reward", "python:reward_fns:brightness", "--out", str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: could not load pipeline from 'someorg/not-cached': it is not in the local Hugging Face cache and the hub "
        "cannot be reached; download it where there is a network (huggingface-cli download someorg/not-cached) and "
        "copy the cache, or pass its local folder"]
    assert not (tmp_path / "run").exists()


def test_an_unreachable_hub_is_told_by_exception_type_not_message():
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    from maskopt.models import unreachable

    def chained(outer: Exception, inner: Exception) -> Exception:
        try:
            try:
                raise inner
            except Exception as e:
                raise outer from e
        except Exception as e:
            return e

    assert unreachable(chained(OSError("Cannot load model x"), OfflineModeIsEnabled("offline mode is enabled")))
    assert unreachable(chained(OSError("x"), LocalEntryNotFoundError("not cached")))
    assert unreachable(chained(OSError("x"), ConnectionError("reset by peer")))
    assert not unreachable(chained(OSError("connection offline not fully cached"), ValueError("bad repo id")))
    assert not unreachable(OSError("401 Client Error: Repository Not Found"))


def test_inspect_without_a_model_lists_the_embedded_default():
    r = CliRunner().invoke(main, ["inspect", "--targets", "paper"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "U-Net maskopt:default: 1.47M parameters" and "paper: 32 units" in r.output
