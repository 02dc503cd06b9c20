"""The command line itself: --version, --help on every command, one consistent --out."""

from __future__ import annotations

import time

from click.testing import CliRunner

from geoseg import __version__
from geoseg.cli import main
from tests.utils import geoseg


def test_version():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


# Commands that write nothing of their own: groups (`prepare`'s commands are checked below).
NO_OUT = {"qgis", "prepare"}


def test_every_command_has_help_and_out():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for name, command in main.commands.items():
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, name
        assert name in NO_OUT or "--out" in res.output, f"{name} lacks --out"
        assert name in top.output
        assert command.help


def test_prepare_commands_take_src_and_out():
    for name in ("vaihingen", "dfc2018"):
        res = CliRunner().invoke(main, ["prepare", name, "--help"])
        assert res.exit_code == 0 and "--src" in res.output and "--out" in res.output, name


def test_build_dataset_help_lists_the_documented_options():
    res = CliRunner().invoke(main, ["build-dataset", "--help"])
    for option in (
        "--region",
        "--bbox",
        "--aoi",
        "--year",
        "--datetime",
        "--gsd",
        "--tile-size",
        "--max-tiles",
        "--stac-url",
        "--catalog",
        "--scheduler",
        "--workers",
        "--out",
    ):
        assert option in res.output, option  # fmt: skip


def test_a_missing_checkpoint_is_reported_before_torch_is_imported(tmp_path):
    """predict took 12-14 s to say that the checkpoint path was wrong (torch and Lightning load
    first); the file is now checked before those imports."""
    missing = tmp_path / "none.ckpt"
    for command in (
        ("predict", "--image", str(tmp_path / "scene.tif")),
        ("evaluate", "--data", str(tmp_path)),
    ):
        t0 = time.perf_counter()
        res = geoseg(command[0], "--checkpoint", str(missing), *command[1:],
                     "--out", str(tmp_path / "out"))  # fmt: skip
        assert res.returncode == 2
        assert res.stderr.strip() == f"geoseg: error: checkpoint not found: {missing}"
        assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "out").exists()
