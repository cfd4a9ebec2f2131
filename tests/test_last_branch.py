"""Issue 18.1a: the deepest branch's trunk, ``method.last_branch`` = stage (HSAKD's code:
the last stage rebuilt at stride 1 on its own width) or block (one extra block, lsskd
before issue 18). Golden parameter counts were measured and checked by hand below."""
import json

import pytest
import torch

from lsskd.config import build_config
from lsskd.errors import ConfigError
from lsskd.engine.profile import count_params
from lsskd.models import build_model
from lsskd.registry import METHODS

# 100 classes. trunk = deepest branch's trunk (blocks + fresh ``final``); total = backbone
# + every LSSKD branch (trunks and joint heads over 4 x 100 labels).
GOLDEN = {
    ("resnet20", "stage"): {"trunk": 221_952, "total": 1_041_316},
    ("resnet20", "block"): {"trunk": 73_984, "total": 893_348},
    ("resnet56", "stage"): {"trunk": 665_856, "total": 3_067_684},
    ("resnet56", "block"): {"trunk": 73_984, "total": 2_475_812},
    ("wrn_40_2", "stage"): {"trunk": 1_772_800, "total": 8_024_484},
    ("wrn_40_2", "block"): {"trunk": 295_680, "total": 6_547_364},
}


def lsskd(model, last, classes=100, seed=0):
    torch.manual_seed(seed)
    return METHODS.build("lsskd", build_model(model, classes), {"last_branch": last}, num_train=0)


@pytest.mark.parametrize("model,last", sorted(GOLDEN))
def test_parameter_counts_both_ways(model, last):
    m = lsskd(model, last)
    assert count_params(m.aux[-1].trunk) == GOLDEN[model, last]["trunk"]
    assert count_params(m) == GOLDEN[model, last]["total"]


def test_resnet20_counts_by_hand():
    """CIFAR ResNet-20: n = 3 basic blocks per stage, widths 16-32-64, 100 classes."""
    def block(cin, cout):  # two 3x3 convs + two BNs (+ 1x1 projection and BN if cin != cout)
        return 9 * cin * cout + 9 * cout * cout + 4 * cout + (cin * cout + 2 * cout if cin != cout else 0)

    stage2 = block(16, 32) + 2 * block(32, 32)
    stage3 = block(32, 64) + 2 * block(64, 64)
    head = 64 * 400 + 400  # joint head, 4 rotations x 100 classes
    backbone = count_params(build_model("resnet20", 100))
    assert backbone == 278_324
    # HSAKD's block_extractor3: _make_layer(BasicBlock, 64, n=3, stride=1) on 64 channels.
    last_stage, last_block = 3 * block(64, 64), block(64, 64)
    assert (last_stage, last_block) == (221_952, 73_984)
    common = backbone + (stage2 + stage3) + stage3 + 3 * head
    assert common + last_stage == GOLDEN["resnet20", "stage"]["total"]
    assert common + last_block == GOLDEN["resnet20", "block"]["total"]


# Blocks in the deepest trunk under last=stage, per family (HSAKD's block_extractor for
# the families it has; the number of blocks of the backbone's last stage otherwise).
STAGE_BLOCKS = {"resnet8": 1, "resnet20": 3, "resnet56": 9, "resnet8x4": 1, "resnet32x4": 5,
                "wrn_16_2": 2, "wrn_40_2": 6, "mobilenetv2": 4, "vgg8": 2, "vgg13": 4,
                "shufflev1": 4, "shufflev2": 4, "resnet1d": 2, "tinycnn1d": 1}


@pytest.mark.parametrize("name", sorted(STAGE_BLOCKS))
def test_stage_trunk_is_shape_preserving_and_has_the_stage_depth(name):
    torch.manual_seed(0)
    bb = build_model(name, 10).eval()
    S = bb.num_stages
    stage, block = bb.branch_trunk(S - 1, last="stage").eval(), bb.branch_trunk(S - 1, last="block").eval()
    assert len(stage) - 1 == STAGE_BLOCKS[name] and len(block) == 2  # blocks + final
    x = torch.randn(2, *bb.probe_shape)
    with torch.no_grad():
        f = bb.forward_stages(x)[-1]
        # Same output as the backbone's last stage feeds its head: C_S (after final) at its resolution.
        ref = bb.final(f)
        for trunk in (stage, block):
            assert trunk(f).shape == ref.shape
    # Every block of the stage trunk is fresh: no parameter shared with the backbone.
    ids = {id(p) for p in bb.parameters()}
    assert not any(id(p) in ids for p in stage.parameters())
    with pytest.raises(ValueError, match="stage' or 'block"):
        bb.branch_trunk(S - 1, last="stages")


@pytest.mark.parametrize("name", ["resnet8", "tinycnn1d"])
def test_one_block_per_stage_means_stage_equals_block_bit_for_bit(name):
    """resnet8 and tinycnn1d (every results/ run so far) have one block per stage: the two
    settings build the same modules with the same random draws."""
    torch.manual_seed(3)
    a = build_model(name, 10).branch_trunk(2, last="stage").state_dict()
    rng_a = torch.random.get_rng_state()
    torch.manual_seed(3)
    b = build_model(name, 10).branch_trunk(2, last="block").state_dict()
    assert torch.equal(rng_a, torch.random.get_rng_state())
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resnet8_lsskd_trains_identically_both_ways(tmp_path, cifar_root):
    rows = {}
    for last in ("stage", "block"):
        over = ["method.name=lsskd", f"method.last_branch={last}", "model.name=resnet8",
                f"data.root={cifar_root}", "data.classes=3", f"out_dir={tmp_path / last}", "train.epochs=2",
                "train.max_steps_per_epoch=3", "train.batch_size=32", "train.progress=false",
                "train.tensorboard=false", "optim.schedule=cosine", "seed=5", "train.threads=1"]
        from lsskd.engine.trainer import Trainer

        summary = Trainer(build_config(None, over)).fit()
        lines = [json.loads(l) for l in (tmp_path / last / "metrics.jsonl").read_text().splitlines()]
        rows[last] = ([{k: v for k, v in r.items() if not any(t in k for t in ("seconds", "per_s", "time"))} for r in lines],
                      summary["params_train"], summary["macs_train"])
    assert rows["stage"] == rows["block"]
    assert rows["stage"][0][-1]["train_loss_hier"] > 0


def test_default_is_stage_and_bad_values_are_config_errors():
    from lsskd.methods.lsskd import LSSKD

    assert LSSKD.defaults["last_branch"] == "stage"
    for name in ("lsskd", "lsskd_robust", "sad_ce"):
        assert METHODS.get(name).defaults["last_branch"] == "stage"
    with pytest.raises(ConfigError, match="last_branch"):
        lsskd("resnet8", "blocks", classes=10)


def test_byot_never_builds_the_deepest_level():
    """BYOT's deepest exit is the backbone's own head, so last_branch does not concern it."""
    torch.manual_seed(0)
    bb = build_model("resnet20", 10)
    calls = []
    orig = bb.branch_trunk
    bb.branch_trunk = lambda level, *a, **k: calls.append(level) or orig(level, *a, **k)
    METHODS.build("byot", bb, {}, num_train=0)
    assert calls == [0, 1]


def test_staged_adapter_stage_rule_and_last_stage_override():
    from torch import nn

    from lsskd.models import StagedAdapter

    def block(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    net = nn.Module()
    net.stem = nn.Conv2d(3, 8, 3, 1, 1)
    net.layer1 = nn.Sequential(block(8, 8), block(8, 8))
    net.layer2 = nn.Sequential(block(8, 16, 2), block(16, 16), block(16, 16))
    net.fc = nn.Linear(16, 4)
    kw = dict(stem="stem", stages=["layer1", "layer2"], classifier="fc", probe_shape=(3, 16, 16))
    staged = StagedAdapter(net, **kw)
    # Default: extra block (a fresh copy of layer2's last child) + copies of children 1..2.
    stage = staged.branch_trunk(1, "stage")
    assert len(stage) == 3 + 1 and len(staged.branch_trunk(1, "block")) == 1 + 1
    f = torch.randn(2, 16, 8, 8)
    assert stage(f).shape == f.shape
    own = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU())
    custom = StagedAdapter(net, last_stage=own, **kw).branch_trunk(1, "stage")
    assert len(custom) == 2 and isinstance(custom[0][0], nn.Conv2d) and custom[0][0].weight is not own[0].weight
