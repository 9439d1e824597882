"""Bad input to the converter: one clear line, a non-zero exit, and nothing half-written."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reference import torch_transformer
from test_conversion import REPO, convert


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "transformer"
    torch_transformer().save_pretrained(folder)
    return folder


def expect_failure(capsys, tmp_path, src, *flags, dst=None, match=""):
    dst = dst or tmp_path / "out"
    before = sorted(p.name for p in dst.parent.iterdir())
    assert convert(*flags, src, dst) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert match in err, err
    after = sorted(p.name for p in dst.parent.iterdir())
    assert after == before, f"left behind: {set(after) - set(before)}"  # no destination, no temp folder
    return err


def test_truncated_safetensors(capsys, tmp_path, good_folder):
    data = (good_folder / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    err = expect_failure(capsys, tmp_path, tmp_path / "cut.safetensors", match="truncated")
    assert "cut.safetensors" in err


def test_corrupt_header(capsys, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes((40).to_bytes(8, "little") + b"{not json at all" + b" " * 40)
    expect_failure(capsys, tmp_path, tmp_path / "bad.safetensors", match="corrupt")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    expect_failure(capsys, tmp_path, tmp_path / "tiny.safetensors", match="truncated")


def test_folder_without_weights(capsys, tmp_path, good_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((good_folder / "config.json").read_text())
    expect_failure(capsys, tmp_path, tmp_path / "empty", match="no .safetensors weights")


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "model.pt", "model.ckpt"])
def test_pickle_is_refused_and_never_opened(capsys, tmp_path, name):
    # A pickle whose unpickling would create a marker file: it must never be unpickled.
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return open, (str(marker), "w")

    (tmp_path / name).write_bytes(pickle.dumps({"weight": Trap()}))
    err = expect_failure(capsys, tmp_path, tmp_path / name, match="refusing a pickle")
    assert name in err and not marker.exists()
    (tmp_path / "folder").mkdir()
    (tmp_path / name).rename(tmp_path / "folder" / name)
    expect_failure(capsys, tmp_path, tmp_path / "folder", match="refusing a pickle")


def test_pickle_disguised_as_safetensors(capsys, tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "sneaky.safetensors")  # a zip-based pickle
    expect_failure(capsys, tmp_path, tmp_path / "sneaky.safetensors", match="refusing a pickle")


def test_checkpoint_of_another_shape(capsys, tmp_path, good_folder):
    other = torch_transformer(num_attention_heads=4, attention_head_dim=32)  # wider model
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "other.safetensors")
    err = expect_failure(capsys, tmp_path, tmp_path / "other.safetensors", "--config",
                         good_folder / "config.json", match="wrong-shape")
    assert "67 wrong-shape (img_in.bias (128,) vs expected (64,), img_in.weight (128, 16) vs expected (64, 16)" in err


def test_checkpoint_of_another_model(capsys, tmp_path, good_folder):
    tensors = {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)}
    save_file(tensors, tmp_path / "vae.safetensors")
    err = expect_failure(capsys, tmp_path, tmp_path / "vae.safetensors", "--config",
                         good_folder / "config.json", match="missing")
    assert "unexpected (encoder.conv_in.weight" in err or "encoder.conv_in.weight" in err


def test_missing_and_extra_keys_are_named(capsys, tmp_path, good_folder):
    sd = {k: v.contiguous() for k, v in torch_transformer().state_dict().items()}
    sd.pop("transformer_blocks.1.attn.norm_k.weight")
    sd["transformer_blocks.7.attn.to_q.weight"] = torch.zeros(64, 64)
    save_file(sd, tmp_path / "w.safetensors")
    err = expect_failure(capsys, tmp_path, tmp_path / "w.safetensors", "--config", good_folder / "config.json")
    assert "1 missing (transformer_blocks.1.attn.norm_k.weight)" in err
    assert "1 unexpected (transformer_blocks.7.attn.to_q.weight)" in err


def test_existing_destination_is_kept(capsys, tmp_path, good_folder):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    expect_failure(capsys, tmp_path, good_folder, dst=dst, match="not empty")
    assert (dst / "precious.txt").read_text() == "keep me"
    # The reverse direction refuses in the same way.
    assert convert(good_folder, tmp_path / "flax") == 0
    capsys.readouterr()
    expect_failure(capsys, tmp_path, tmp_path / "flax", "--to", "diffusers", dst=dst, match="not empty")


def test_cli_exit_code_and_single_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_weights.py"), str(tmp_path / "nothing"), str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no such file or folder" in result.stderr
    assert not (tmp_path / "o").exists()
