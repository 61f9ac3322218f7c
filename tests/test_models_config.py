"""Config -> model: every flow config builds for its domain, and mistakes are named."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gflows.models.config import image_model_from_config, lattice_model_from_config
from gflows.training.run import FLOWS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "flow").glob("*.yaml")
                 if not p.stem.startswith("default_"))
SMALL = {"image": ["flow.n_scales=1", "flow.blocks_per_scale=1", "flow.hidden_channels=8",
                   "flow.fc_hidden=8"],
         "lattice": ["flow.hidden_channels=8"]}


def flow_config(name: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", [f"flow={name}", *overrides]).flow


def build(flow):
    if flow.domain == "image":
        return image_model_from_config(flow, (3, 8, 8), 0.05)
    return lattice_model_from_config(flow, 4)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_flow_config_builds(name):
    flow = flow_config(name)
    flow = flow_config(name, *SMALL[flow.domain], *(["flow.fc_blocks=1"] if flow.kind == "residual" and
                                                   flow.domain == "image" else []))
    model = build(flow)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert name in FLOWS[flow.domain]  # the run's error messages offer it


def test_twins_extend_the_g_flows():
    for g, twin in [("g_coupling", "coupling"), ("g_residual", "residual"),
                    ("lattice_g_coupling", "lattice_coupling"), ("lattice_g_residual", "lattice_residual")]:
        a, b = flow_config(g), flow_config(twin)
        assert a.group == "d4" and b.group == "trivial"
        assert {k for k in a if a[k] != b[k]} <= {"name", "group", "sign_symmetric"}


@pytest.mark.parametrize("name", ["g_coupling", "coupling", "g_residual", "residual"])
def test_digits_size_the_image_flows(name):
    """data=digits sizes the image flows for 8x8 images (configs/size/), after the flow's own config
    and before the preset; the command line has the last word."""
    cifar, digits = flow_config(name), flow_config(name, "data=digits")
    assert (cifar.n_scales, cifar.hidden_channels) != (digits.n_scales, digits.hidden_channels)
    assert (digits.n_scales, digits.blocks_per_scale, digits.hidden_channels) == (2, 4, 64)
    assert {k for k in cifar if cifar[k] != digits[k]} <= {"n_scales", "hidden_channels", "fc_blocks"}
    assert flow_config(name, "data=digits", "flow.hidden_channels=24").hidden_channels == 24
    assert flow_config(name, "data=digits", "preset=tiny").hidden_channels == 16
    if name.endswith("residual"):  # data=digits' default flow is the same model
        default = flow_config("default_digits", "data=digits")
        assert {k for k in digits if digits[k] != default[k]} <= {"name", "group"}


def test_mistakes_are_named():
    with pytest.raises(ValueError, match="flow=lattice_coupling is a lattice flow, not an image flow"):
        image_model_from_config(flow_config("lattice_coupling"), (3, 8, 8), 0.05)
    with pytest.raises(ValueError, match="unknown flow kind 'maf' for image flows"):
        build(flow_config("g_coupling", "flow.kind=maf"))
    with pytest.raises(ValueError, match="unknown setting 'depth' for lattice_flow"):
        build(flow_config("lattice_coupling", "+flow.depth=3"))
    with pytest.raises(ValueError, match="unknown factor_out 'halves': expected false, true, 'fields'"):
        build(flow_config("g_coupling", "flow.factor_out=halves"))


def test_glows_split_by_halves_and_kernels_per_scale_from_the_command_line():
    from gflows.nn.equivariant import GConv2d
    from gflows.transforms.reshape import HalvingSqueeze

    small = ("flow.n_scales=2", "flow.blocks_per_scale=1", "flow.hidden_channels=8")
    flow = flow_config("g_coupling", *small, "flow.factor_out=half")
    assert any(isinstance(m, HalvingSqueeze) for m in build(flow).modules())
    flow = flow_config("g_coupling", *small, "flow.scale_kernel_sizes=[[3,1,3],[3,1]]")
    assert [m.kernel_size for m in build(flow).modules() if isinstance(m, GConv2d)] == [3, 1, 3, 3, 1]


def test_one_width_per_scale_from_the_command_line():
    from gflows.nn.equivariant import GConv2d

    small = ("flow.n_scales=2", "flow.blocks_per_scale=1", "flow.block.kernel_sizes=[3,3]", "group=d4")
    flow = flow_config("g_coupling", *small, "flow.hidden_channels=[8,24]")
    # each block's hidden layer, then its output: 1 and 3 regular D4 fields of 8 channels
    hidden = [m.out_channels for m in build(flow).modules() if isinstance(m, GConv2d)][::2]
    assert hidden == [8, 24]
    with pytest.raises(ValueError, match=r"flow.hidden_channels: a hidden width must be at least 1 channel"):
        build(flow_config("g_coupling", *small, "flow.hidden_channels=[8,0]"))
    with pytest.raises(ValueError, match="hidden_fields must be one count >= 1 or 2 counts"):
        build(flow_config("g_coupling", *small, "flow.hidden_channels=[8,8,8]"))
    with pytest.raises(ValueError, match=r"a lattice flow has one width, got \[8, 16\]"):
        build(flow_config("lattice_g_coupling", "flow.hidden_channels=[8,16]"))


@pytest.mark.parametrize("name", ["g_coupling", "lattice_g_coupling"])
def test_an_empty_width_is_named_by_its_key(name):
    message = "flow.hidden_channels: a hidden width must be at least 1 channel, got 0"
    with pytest.raises(ValueError, match=message):
        build(flow_config(name, "flow.hidden_channels=0"))


def test_probe_fraction_from_the_command_line():
    """Every residual block of an image model, convolutional and fully connected, takes the log-det
    series' probe fraction and probe distribution; out-of-range or unknown ones are named before
    training."""
    from gflows.transforms.residual import ResidualTransform

    small = (*SMALL["image"], "flow.fc_blocks=1")
    model = build(flow_config("g_residual", *small, "flow.block.probe_fraction=0.5",
                              "flow.block.probe=rademacher"))
    blocks = [m for m in model.modules() if isinstance(m, ResidualTransform)]
    assert len(blocks) == 2 and all(b.probe_fraction == 0.5 and b.probe == "rademacher" for b in blocks)
    with pytest.raises(ValueError, match=r"probe_fraction must lie in \(0, 1\], got 0"):
        build(flow_config("g_residual", *small, "flow.block.probe_fraction=0"))
    with pytest.raises(ValueError, match="unknown probe 'normal'"):
        build(flow_config("g_residual", *small, "flow.block.probe=normal"))
