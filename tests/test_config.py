import pytest

from mirage_jax import cli, config
from conftest import REPO

TINY = REPO / "configs" / "tiny.py"


def test_overrides_apply_with_types():
    cfg = config.load(
        TINY, ["--config.model.depth=3", "config.model.remat=full", "--config.optim.lr=2"]
    )
    assert cfg.model.depth == 3 and cfg.model.remat == "full"
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.dept=3", "unknown config key 'model.dept'"),
        ("--config.modle.depth=3", "unknown config key 'modle.depth'"),
        ("--config.model.depth=abc", "config key 'model.depth' must be int"),
        ("--config.model.scan_layers=3", "config key 'model.scan_layers' must be bool"),
        ("--config.model.remat=sometimes", "config key 'model.remat' has an invalid value"),
        ("--config.vae.mouth_region=(0.8,0.2,0.0,1.0)",
         "config key 'vae.mouth_region' has an invalid value"),
    ],
)
def test_bad_override_names_the_key(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(TINY, [override])


def test_flat_projections_refused_with_sequence_parallelism():
    config.load(TINY, ["--config.model.flat_projections=True"])
    with pytest.raises(config.ConfigError, match="'model.flat_projections' has an invalid"):
        config.load(TINY, ["--config.model.flat_projections=True", "--config.mesh.sequence=2"])


def test_config_file_with_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from mirage_jax.config import base_config\n"
        "def get_config():\n  c = base_config()\n"
        "  with c.unlocked():\n    c.model.widht = 3\n  return c\n"
    )
    with pytest.raises(config.ConfigError, match="model.widht"):
        config.load(bad)


def test_cli_reports_bad_key_without_traceback(capsys, tmp_path):
    rc = cli.main(
        ["train", "--config", str(TINY), "--workdir", str(tmp_path), "--config.train.stepz", "3"]
    )
    assert rc == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err


def test_all_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.py")):
        config.load(path)
