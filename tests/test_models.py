"""The backbone zoo: every registered model honours the stage contract, branch
trunks are shape-correct and freshly initialised, and parameter counts match the
standard definitions (golden integers, cross-checked in docs/models.md)."""
import contextlib
import math

import pytest
import torch
from torch import nn

from lsskd.models import StagedAdapter, StagedBackbone, build_model, describe_stages
from lsskd.registry import MODELS

# Exact counts at 100 classes. Published figures they were checked against are in
# docs/models.md (CRD/HSAKD tables round to 0.01M; torchvision/kuangliu are exact).
GOLDEN_PARAMS_100 = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_16_4": 2_772_020,
    "wrn_28_10": 36_536_884,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "wrn_40_4": 8_972_340,
    "preact_resnet18": 11_218_340,
    "preact_resnet34": 21_326_500,
    "preact_resnet50": 23_697_572,
    "preact_resnet101": 42_689_700,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "mobilenetv2_w05": 812_836,
    "mobilenetv2_w10": 2_353_060,
    "shufflev1": 949_258,
    "shufflenetv1": 949_258,
    "shufflev2": 1_355_528,
    "shufflenetv2": 1_355_528,
    "resnext29": 34_518_948,
    "resnext29_8x64d": 34_518_948,
    "resnext29_2x64d": 9_222_564,
    "resnet18_cifar": 11_220_132,
}
# ImageNet-stem ResNets are built (and counted) at their natural 1000 classes:
# torchvision's published counts.
GOLDEN_PARAMS_1000 = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}

ZOO_MODULES = {
    f"lsskd.models.{m}"
    for m in ("cifar_resnet", "wrn", "preact_resnet", "vgg", "mobilenetv2", "shufflenet", "resnext", "imagenet_resnet")
}
# Above this many parameters a model is forwarded at a reduced resolution and only
# its deepest branch (the model-specific extra block) is built, to keep the suite
# fast on CPU; the smallest member of each large family gets every branch.
BIG = 5_000_000
FULL_BRANCH_CHECK = {"preact_resnet18", "resnet18", "resnext29_2x64d"}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def input_shape(model: StagedBackbone):
    shape = list(model.probe_shape)
    if len(shape) == 3:
        side = min(shape[1], 64)  # ImageNet-style models run at 64x64
        if n_params(model) > BIG and side == 32:
            side = 8
        shape[1:] = [side, side]
    return (2, *shape)




def registered_models():
    """One name per factory (aliases such as ``resnext29`` share a factory)."""
    seen, names = set(), []
    for n in MODELS.names():
        if MODELS.get(n) not in seen:
            seen.add(MODELS.get(n))
            names.append(n)
    return names


@contextlib.contextmanager
def skip_default_conv_init():
    """StagedBackbone._finish re-initialises every conv (kaiming_init), so PyTorch's
    own default conv init at construction is wasted work; skipping it halves the
    build time of the large models and leaves the built model unchanged in law."""
    saved = nn.modules.conv._ConvNd.reset_parameters
    nn.modules.conv._ConvNd.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.modules.conv._ConvNd.reset_parameters = saved


@pytest.fixture(scope="module", params=registered_models())
def built(request):
    """One model per registered factory, built once for all tests that use it."""
    torch.manual_seed(0)
    classes = 1000 if request.param in GOLDEN_PARAMS_1000 else 100
    with skip_default_conv_init():
        model = build_model(request.param, num_classes=classes)
    x = torch.randn(*input_shape(model), generator=torch.Generator().manual_seed(1))
    return request.param, model, x


def test_forward_and_stage_contract(built):
    name, model, x = built
    assert isinstance(model, StagedBackbone)
    model.train()
    assert model(x).shape == (2, model.num_classes)
    feats, h, logits = model.forward_features(x)
    assert len(feats) == model.num_stages == len(model.stage_channels) == len(model.stage_strides)
    assert [f.shape[1] for f in feats] == model.stage_channels
    assert h.shape == (2, model.feature_dim)
    assert logits.shape == (2, model.num_classes)
    assert model.num_classes == (1000 if name in GOLDEN_PARAMS_1000 else 100)
    # Spatial sizes follow the probed strides (stride-2 convs give ceil(n / 2)).
    for prev, cur, s in zip(feats, feats[1:], model.stage_strides[1:]):
        assert tuple(cur.shape[2:]) == tuple(math.ceil(n / s) for n in prev.shape[2:])
    assert all(s in (1, 2) for s in model.stage_strides)
    # The zoo declares its stage layout; a probe forward pass must read the same.
    assert describe_stages(model) == (model.stage_channels, model.stage_strides), name
    if len(model.probe_shape) == 3 and model.probe_shape[1] > 64:
        # ImageNet-stem models must also run on CIFAR-sized images.
        assert model(torch.randn(2, model.probe_shape[0], 32, 32)).shape == (2, model.num_classes)


def test_branch_trunks_fresh_and_shaped(built):
    name, model, x = built
    model.train()
    with torch.no_grad():
        feats = model.forward_stages(x)
    big = n_params(model) > BIG and name not in FULL_BRANCH_CHECK
    backbone_ptrs = {p.data_ptr() for p in model.parameters()}
    S = model.num_stages
    # The deepest branch both ways (method.last_branch): the last stage at stride 1, one block.
    levels = [(S - 1, "stage"), (S - 1, "block")]
    if not big:
        levels = [(level, "stage") for level in range(S - 1)] + levels
    for level, last in levels:
        f = feats[level]
        trunk = model.branch_trunk(level, last)
        trunk.train()
        with torch.no_grad():
            pooled = model.pool(trunk(f))
        assert pooled.shape == (2, model.feature_dim), (name, level)
        params = list(trunk.parameters())
        assert params and not ({p.data_ptr() for p in params} & backbone_ptrs), (name, level)
        assert all(p.requires_grad for p in params)
        for m in trunk.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.num_batches_tracked.item() == 1  # reset, then this one forward
        first = trunk[0]
        if level < model.num_stages - 1:
            # A re-initialised copy of stage level+1: same architecture, other weights.
            ref = model.stages[level + 1].state_dict()
            got = first.state_dict()
            assert list(got) == list(ref)
            conv_keys = [k for k, v in got.items() if v.dim() >= 3]
            assert conv_keys and any(not torch.equal(got[k], ref[k]) for k in conv_keys), (name, level)
        elif last == "block":
            # The deepest branch's extra block is stride 1 and keeps the width.
            with torch.no_grad():
                assert first(f).shape == f.shape, name
        else:
            # The last stage rebuilt at stride 1 on C_S: the blocks before ``final`` keep the
            # shape (its first block may change the width inside, as MobileNetV2's does).
            with torch.no_grad():
                assert trunk[:-1](f).shape == f.shape, name
        del trunk


def test_eval_is_deterministic_and_batch_independent(built):
    name, model, x = built
    model.eval()
    with torch.no_grad():
        a = model(x)
        b = model(x)
        _, _, c = model.forward_features(x)
        single = model(x[:1])
    model.train()
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert torch.isfinite(a).all()
    # (allclose, not torch.testing: its first import costs more than the check.)
    assert torch.allclose(single, a[:1], rtol=1e-4, atol=1e-4), (single - a[:1]).abs().max()


def test_parameter_count_matches_golden(built):
    name, model, _ = built
    golden = {**GOLDEN_PARAMS_100, **GOLDEN_PARAMS_1000}
    if name not in golden:
        pytest.skip(f"{name} is not part of the image backbone zoo")
    assert n_params(model) == golden[name]
    # Aliases build the same network.
    for alias in MODELS.names():
        if alias != name and MODELS.get(alias) is MODELS.get(name):
            assert golden[alias] == golden[name]
    if name in GOLDEN_PARAMS_1000:
        assert model.probe_shape == (3, 224, 224)
        # 7x7/2 conv + max-pool: the stages see 56, 28, 14, 7 on a 224 image.
        assert model.stage_strides == [1, 2, 2, 2]


def test_every_zoo_model_has_a_golden_count():
    zoo = {n for n in MODELS.names() if MODELS.get(n).__module__ in ZOO_MODULES}
    assert zoo == set(GOLDEN_PARAMS_100) | set(GOLDEN_PARAMS_1000)


def test_generic_builders_and_bad_arguments():
    from lsskd.models.resnext import build_resnext29
    from lsskd.models.wrn import build_wrn

    wrn = build_wrn(22, 3, num_classes=10)
    assert wrn.stage_channels == [48, 96, 192] and len(wrn.stages[0]) == 3
    assert wrn.feature_dim == 192 and wrn.num_classes == 10
    rx = build_resnext29(4, 16, num_classes=10)
    assert rx.stage_channels == [256, 512, 1024]
    assert rx.stages[0][0].body[3].groups == 4 and rx.stages[2][0].body[0].out_channels == 4 * 16 * 4
    with pytest.raises(ValueError, match="6n\\+4"):
        build_wrn(20, 2)
    from lsskd.models.mobilenetv2 import MobileNetV2

    with pytest.raises(ValueError, match="width"):
        MobileNetV2(10, width=0)
    for alias, canonical in (("mobilenetv2", "mobilenetv2_w05"), ("resnext29", "resnext29_8x64d"),
                             ("shufflenetv1", "shufflev1"), ("shufflenetv2", "shufflev2")):
        assert MODELS.get(alias) is MODELS.get(canonical)


# --------------------------------------------------------------- StagedAdapter
class UserBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class UserNet(nn.Module):
    """A user's own model, written without knowing about the stage contract."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(UserBlock(8, 8), UserBlock(8, 8))
        self.layer2 = nn.Sequential(UserBlock(8, 16, 2), UserBlock(16, 16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_staged_adapter_wraps_user_module():
    torch.manual_seed(0)
    net = UserNet().eval()
    staged = StagedAdapter(net, stem=["conv1", "bn1", "relu"], stages=["layer1", "layer2"], classifier="fc")
    staged.eval()
    assert staged.stage_channels == [8, 16] and staged.stage_strides == [1, 2]
    assert staged.feature_dim == 16 and staged.num_classes == 5
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        before = staged(x)
        assert torch.allclose(before, net(x), atol=1e-6)
        # Parameters are shared, not copied: editing the user's model changes the adapter.
        net.fc.bias.add_(1.0)
        assert torch.allclose(staged(x), before + 1.0, atol=1e-5)
        assert torch.allclose(staged(x), net(x), atol=1e-6)
    assert {p.data_ptr() for p in staged.parameters()} == {p.data_ptr() for p in net.parameters()}

    feats = staged.forward_stages(x)
    net_ptrs = {p.data_ptr() for p in net.parameters()}
    for level, f in enumerate(feats):
        trunk = staged.branch_trunk(level)
        assert staged.pool(trunk(f)).shape == (3, 16)
        assert not ({p.data_ptr() for p in trunk.parameters()} & net_ptrs)
    # Default deepest extra block: a fresh copy of layer2's last block (16 -> 16, stride 1).
    extra = staged.branch_trunk(1)[0]
    assert isinstance(extra, UserBlock) and extra.conv.in_channels == extra.conv.out_channels == 16
    assert not torch.equal(extra.conv.weight, net.layer2[1].conv.weight)


def test_staged_adapter_custom_extra_block_and_errors():
    net = UserNet()
    custom = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU())
    staged = StagedAdapter(net, stem=["conv1", "bn1", "relu"], stages=["layer1", "layer2"],
                           classifier="fc", extra_block=custom, probe_shape=(3, 16, 16))
    extra = staged.branch_trunk(1)[0]
    assert isinstance(extra[0], nn.Conv2d) and extra[0].weight is not custom[0].weight
    with pytest.raises(KeyError, match="layer3"):
        StagedAdapter(net, stem="conv1", stages=["layer1", "layer3"], classifier="fc")
    with pytest.raises(TypeError, match="nn.Linear"):
        StagedAdapter(net, stem="conv1", stages=["layer1"], classifier="layer2")
