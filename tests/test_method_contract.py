"""The typed method contract (issue 19.2): MethodContext, the one-pass eval_forward, the
shared Branch module, training_macs in the base class, stores recognised by type, and the
KD class-name check in a real run."""
import torch
import pytest

from lsskd.config import build_config
from lsskd.errors import ConfigError
from lsskd.data import DataBundle
from lsskd.engine import Trainer
from lsskd.engine.profile import count_macs
from lsskd.methods import build_method
from lsskd.methods.base import Method, MethodContext
from lsskd.methods.branch import Branch
from lsskd.methods.byot import BeYourOwnTeacher
from lsskd.methods.store import StoreBase
from lsskd.models import build_model
from lsskd.registry import METHODS


def _cell(cifar_bundle, classes, train_per_class=8, test_per_class=4):
    tr, te = cifar_bundle.train.select_classes(classes), cifar_bundle.test.select_classes(classes)
    first = lambda ds, n: torch.cat([torch.nonzero(ds.y == c).flatten()[:n] for c in range(len(classes))])
    return DataBundle(tr.subset(first(tr, train_per_class)), te.subset(first(te, test_per_class)),
                      mean=cifar_bundle.mean, std=cifar_bundle.std, modality="image")


def _cfg(out, method, *extra):
    return build_config(None, [
        f"out_dir={out}", "model.name=resnet8", f"method.name={method}", *extra, "train.epochs=1",
        "train.batch_size=16", "train.eval_batch_size=64", "train.device=cpu",
        "train.progress=false", "train.tensorboard=false"])


def test_context_from_bundle_and_keywords(cifar_bundle):
    cell = _cell(cifar_bundle, [0, 1])
    ctx = MethodContext.from_bundle(cell, cutmix_prob=0.5)
    assert ctx.num_train == 16 and ctx.classes == ("apple", "aquarium_fish")
    assert ctx.input_shape == (3, 32, 32) and ctx.modality == "image" and not ctx.has_val
    assert ctx.cutmix_prob == 0.5 and torch.equal(ctx.train_labels, cell.train.y)
    # The trainer's one call site passes exactly this context.
    cfg = _cfg("unused", "lsskd", "data.augment.cutmix_prob=0.5")
    assert build_method(cfg, cell).context == ctx
    assert MethodContext.of(ctx, train_labels=cell.train.y.clone()) == ctx  # labels are not compared
    # Keywords (tests, scripts) are checked against the dataclass's fields.
    m = METHODS.build("ce", build_model("resnet8", 2), {}, num_train=3, modality="signal")
    assert m.context == MethodContext(num_train=3, modality="signal") and m.num_train == 3
    with pytest.raises(TypeError, match="unknown method context field.*num_samples"):
        METHODS.build("ce", build_model("resnet8", 2), {}, num_samples=3)
    assert MethodContext.of(ctx, has_val=True).has_val and MethodContext.of(ctx, has_val=True).num_train == 16


def test_kd_refuses_a_teacher_trained_on_other_classes(cifar_bundle, tmp_path):
    """The trainer passes the class names, so a same-sized teacher on other classes fails."""
    Trainer(_cfg(tmp_path / "t", "ce", "train.max_steps_per_epoch=1"), bundle=_cell(cifar_bundle, [0, 1, 2, 3])).fit()
    other = _cell(cifar_bundle, [4, 5, 6, 7])
    cfg = _cfg(tmp_path / "s", "kd", f"method.teacher_checkpoint={tmp_path / 't' / 'last.pt'}")
    with pytest.raises(ConfigError, match="different classes \\(index 0: teacher 'apple', student 'beaver'\\)"):
        Trainer(cfg, bundle=other)
    Trainer(cfg, bundle=_cell(cifar_bundle, [0, 1, 2, 3]))  # the teacher's own classes: accepted


@pytest.mark.parametrize("name", ["lsskd", "sad_ce", "byot"])
def test_eval_forward_is_one_backbone_pass_with_the_same_numbers(name):
    torch.manual_seed(0)
    # The view-aggregated ceiling (eval_aggregate) costs a second pass over the other views:
    # off here, counted in the test below.
    cfg = {} if name == "byot" else {"eval_aggregate": "off"}
    m = METHODS.build(name, build_model("resnet8", 5), cfg, num_train=4).eval()
    calls = []
    m.backbone.stem.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 3, 32, 32)
    logits, outs = m.eval_forward(x)
    assert len(calls) == 1
    # Identical to the earlier two-pass evaluation: backbone(x), then each branch on the stages.
    assert torch.equal(logits, m.backbone(x))
    feats = m.backbone.forward_stages(x)
    heads = m.exits if name == "byot" else m.aux
    step = 1 if name == "byot" else m.num_views
    assert list(outs) == [f"branch{l + 1}" for l in range(len(heads))]
    for l, br in enumerate(heads):
        assert torch.equal(outs[f"branch{l + 1}"], br(feats[l])[1][:, ::step])


def test_the_ceiling_costs_one_more_pass_over_the_other_views():
    torch.manual_seed(0)
    m = METHODS.build("sad_ce", build_model("resnet8", 5), {}, num_train=4).eval()
    sizes = []
    m.backbone.stem.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    logits, outs = m.eval_forward(torch.randn(3, 3, 32, 32))
    assert sizes == [3, 9]  # upright, then the three rotated views stacked
    assert {"agg1", "agg2", "agg3", "ensemble"} <= set(outs)


def test_branch_is_shared_and_loads_byot_checkpoints_of_the_exit_era():
    torch.manual_seed(0)
    m = BeYourOwnTeacher(build_model("resnet8", 5))
    assert all(type(e) is Branch for e in m.exits)
    assert all(type(b) is Branch for b in METHODS.build("lsskd", build_model("resnet8", 5), {}).aux)
    sd = m.state_dict()
    old = {k.replace(".head.", ".fc.") if k.startswith("exits.") else k: v for k, v in sd.items()}
    assert "exits.0.fc.weight" in old and "exits.0.head.weight" not in old
    torch.manual_seed(1)
    m2 = BeYourOwnTeacher(build_model("resnet8", 5))
    m2.load_state_dict(old)
    assert torch.equal(m2.exits[1].head.weight, m.exits[1].head.weight)


def test_training_macs_in_the_base_class():
    bb = build_model("resnet8", 5)
    one = count_macs(bb, (3, 32, 32))
    assert METHODS.build("ce", bb, {}).training_macs((3, 32, 32)) == one
    assert METHODS.build("ls", build_model("resnet8", 5), {}).training_macs((3, 32, 32)) == one
    assert METHODS.build("cskd", build_model("resnet8", 5), {}).training_macs((3, 32, 32)) == 2 * one
    assert not hasattr(Method, "sync_state")


def test_stores_are_recognised_by_type():
    m = METHODS.build("lsskd", build_model("resnet8", 5), {}, num_train=4)
    stores = [mod for mod in m.modules() if isinstance(mod, StoreBase)]
    assert stores == [m.store] and not hasattr(m.store, "is_store")
