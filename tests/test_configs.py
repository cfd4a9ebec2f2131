"""Every YAML under configs/ parses; every experiment config builds its method and
model on a tiny fake DataBundle; the paper configs follow the paper's recipe, the
CPU variants mirror them, and the sweep plans cover them (configs/README.md).

Building ~100 distinct method+model pairs (PreAct ResNet-101 with LSSKD branches has
150M parameters) is dominated by random weight initialisation, which says nothing
about whether a config is valid, so the builds here skip it (``Tensor.normal_`` /
``uniform_`` become no-ops) and configs with the same model share one backbone
instance; everything else (module construction, stage probing, branch copies,
method checks, teacher loading) runs for real, through ``build_method``.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
import yaml

from lsskd.sweep import expand, load_plan
from lsskd.config import build_config
from lsskd.data.base import ArrayDataset, DataBundle
from lsskd.engine.profile import count_macs, count_params
from lsskd.engine import trainer
from lsskd.methods import build as method_build
from lsskd.methods import build_method
from lsskd.models import StagedBackbone, build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PLAN_FILES = sorted((CONFIGS / "sweeps").glob("*.yaml"))
CONFIG_FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if "sweeps" not in p.relative_to(CONFIGS).parts)
PAPER = CONFIGS / "paper"
CPU_PAPER = CONFIGS / "cpu" / "paper"
LR001_MODELS = {"mobilenetv2", "mobilenetv2_w05", "mobilenetv2_w10", "shufflev1", "shufflev2",
                "shufflenetv1", "shufflenetv2"}
# Paper cells without a CPU twin: Tiny-ImageNet is not available on the CPU machine.
NO_CPU_TWIN = {"fig5/f5_tiny_resnet20_ce.yaml", "fig5/f5_tiny_resnet20_lsskd.yaml",
               # no VGG fits the CPU MAC budget (vgg8: 96M MACs per 32x32 image)
               "hsakd/h_vgg13_sad_ce.yaml"}
# Issue 29's cells on Self-KD-Lib's recipe: their CPU rows are the 15-epoch protocol's
# configs/cpu/c100_resnet8_<row>.yaml and the over-fitting cells', not twins under cpu/paper.
SELFKD = PAPER / "selfkd"
NO_CPU_TWIN |= {f"selfkd/{p.name}" for p in SELFKD.glob("*.yaml")}
# HSAKD's students (issue 29): their CPU row is configs/overfit/hsakd.yaml (resnet20 -> resnet8).
NO_CPU_TWIN |= {f"hsakd_students/{p.name}" for p in (PAPER / "hsakd_students").glob("*.yaml")}


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def is_cell(p: Path) -> bool:
    return not p.name.startswith("base")


@functools.lru_cache(maxsize=None)
def _load(p: Path) -> Dict:
    return build_config(p)


def load(p: Path) -> Dict:
    return copy.deepcopy(_load(Path(p).resolve()))


# ----------------------------------------------------------------------------- fake data
def data_spec(cfg: Dict, where: str) -> Tuple[int, Tuple[int, ...], str]:
    """(classes, input shape, modality) the config's dataset would produce, without loading it."""
    d = cfg["data"]
    name, size = d["name"], d["image_size"]
    if name in ("cifar100", "cifar10"):
        c, shape = (100 if name == "cifar100" else 10), (3, 32, 32)
    elif name in ("tiny_imagenet", "tinyimagenet"):
        c, shape = 200, (3, 64, 64)
    elif name == "digits":
        c, shape = 10, (3, 8, 8)
    elif name in ("hapt", "uci_har"):
        return (12 if d["activities"] == "all" else 6), (6, 128), "signal"
    elif name == "folder":
        root = Path(d["root"])
        root = root if root.is_absolute() else ROOT / root
        if (root / "train").is_dir():
            c, shape = folder_spec(str(root))
        elif Path(d["root"]).name == "imagenet":
            c, shape = 1000, (3, 224, 224)
        else:
            pytest.fail(f"{where}: folder dataset {root} not found; add its class count to data_spec")
    else:
        pytest.fail(f"{where}: unknown dataset '{name}'; add it to data_spec in tests/test_configs.py")
    if size:
        shape = (3, size, size)
    return c, shape, "image"


@functools.lru_cache(maxsize=None)
def folder_spec(root: str) -> Tuple[int, Tuple[int, int, int]]:
    from PIL import Image

    classes = sorted(q for q in (Path(root) / "train").iterdir() if q.is_dir())
    with Image.open(next(f for f in sorted(classes[0].iterdir()) if f.is_file())) as im:
        w, h = im.size
    return len(classes), (3, h, w)


def fake_bundle(c: int, shape, modality: str, n: int = 8) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    else:
        x = torch.randn((n, *shape), generator=g)
    y = torch.arange(n) % c
    classes = [f"class{i:04d}" for i in range(c)]
    train = ArrayDataset(x, y, classes, "fake-train")
    return DataBundle(train, ArrayDataset(x.clone(), y.clone(), classes, "fake-test"),
                      mean=[0.5] * shape[0], std=[0.25] * shape[0], modality=modality)


_BACKBONES: "OrderedDict[str, torch.nn.Module]" = OrderedDict()


def _cached_build_model(name, num_classes, **kw):
    # Methods never modify the backbone they wrap (branches are fresh copies), so
    # configs that share a model (adjacent in path order) can share one instance.
    key = json.dumps([name, num_classes, kw], sort_keys=True)
    if key not in _BACKBONES:
        _BACKBONES[key] = build_model(name, num_classes, **kw)
        while len(_BACKBONES) > 3:  # bound the memory held
            _BACKBONES.popitem(last=False)
    _BACKBONES.move_to_end(key)
    return _BACKBONES[key]


@contextmanager
def cheap_builds():
    """No random weight init; one backbone instance per (model, classes, kwargs)."""
    saved = torch.Tensor.normal_, torch.Tensor.uniform_, method_build.build_model
    torch.Tensor.normal_ = lambda self, *a, **k: self
    torch.Tensor.uniform_ = lambda self, *a, **k: self
    method_build.build_model = _cached_build_model
    try:
        yield
    finally:
        torch.Tensor.normal_, torch.Tensor.uniform_, method_build.build_model = saved


# ----------------------------------------------------------------------------- plans
@pytest.fixture(scope="module")
def plans():
    """plan file -> (loaded plan, expanded run specs), read from the repository root."""
    old = Path.cwd()
    os.chdir(ROOT)  # plan config paths are relative to the repository root
    try:
        out = {}
        for p in PLAN_FILES:
            plan = load_plan(p)
            specs = expand(plan["configs"], plan.get("seeds", [0]), plan["out_root"],
                           plan["overrides"], plan["grid"], plan.get("only"))
            out[p] = (plan, specs)
        return out
    finally:
        os.chdir(old)


def test_every_plan_expands_and_covers_every_paper_cell(plans):
    assert PLAN_FILES, "no sweep plans"
    planned: Dict[Path, list] = {}
    for p, (plan, specs) in plans.items():
        assert specs, p
        for c in plan["configs"]:
            planned.setdefault((ROOT / c).resolve(), []).append(p.name)
        # one directory per run
        dirs = [s.out_dir for s in specs]
        assert len(set(dirs)) == len(dirs), p
    cells = [p for tree in (PAPER, CPU_PAPER) for p in tree.rglob("*.yaml") if is_cell(p)]
    assert len(cells) > 100
    for cell in cells:
        where = planned.get(cell.resolve(), [])
        assert len(where) == 1, f"{rel(cell)} is in plans {where} (want exactly one)"
        tree = "_cpu" if CPU_PAPER in cell.parents else ""
        assert where[0].endswith(f"{tree}.yaml") and (tree or not where[0].endswith("_cpu.yaml")), \
            f"{rel(cell)} planned in {where[0]}"


def test_fig5_plans_sweep_the_paper_fractions(plans):
    for name in ("fig5.yaml", "fig5_cpu.yaml"):
        plan, specs = plans[CONFIGS / "sweeps" / name]
        assert plan["grid"] == {"data.train_fraction": [0.25, 0.5, 0.75]}
        fr = {build_config(ROOT / s.config, s.train_overrides())["data"]["train_fraction"] for s in specs}
        assert fr == {0.25, 0.5, 0.75}
        methods = {load(ROOT / c)["method"]["name"] for c in plan["configs"]}
        assert methods == {"ce", "lsskd"}
    datasets = {load(ROOT / c)["data"]["name"] for c in plans[CONFIGS / "sweeps" / "fig5.yaml"][0]["configs"]}
    assert datasets == {"cifar100", "tiny_imagenet"}


def teacher_file(student: Path) -> str:
    """Paper cells read the teacher's best epoch, the published protocol; every cell this project
    scores on test data reads its last epoch, since best.pt is chosen on the test split."""
    return "best.pt" if PAPER in student.parents or CPU_PAPER in student.parents else "last.pt"


def teacher_config(student: Path, ckpt: str) -> Path:
    parts = Path(ckpt).parts
    assert parts[-1] == teacher_file(student) and parts[-2] == "seed0", ckpt
    t = student.parent / f"{parts[-3]}.yaml"
    if not t.is_file():  # a teacher config in another folder (HSAKD's students read configs/paper/hsakd)
        tree = CPU_PAPER if CPU_PAPER in student.parents else PAPER  # a full-scale student, a full-scale teacher
        found = [p for p in CONFIG_FILES if p.stem == parts[-3] and tree in p.parents
                 and (tree == CPU_PAPER or CPU_PAPER not in p.parents)]
        assert len(found) == 1, f"{rel(student)}: teacher config {parts[-3]}.yaml for {ckpt}: {found}"
        t = found[0]
    return t


def test_kd_teachers_are_the_sweep_layout_of_an_earlier_plan(plans):
    """A KD or HSAKD student's teacher_checkpoint (its config's, or its plan's override) is
    <out_root>/<teacher stem>/seed0/{best,last}.pt (``teacher_file``) of a plan with the same out_root that trains the
    teacher (seed 0) and is not the student's own plan; KD's teachers train with CE, HSAKD's
    with SAD-CE (their branches are part of what the student learns from)."""
    planned: Dict[Path, list] = {}
    for p, (plan, _) in plans.items():
        for c in plan["configs"]:
            planned.setdefault((ROOT / c).resolve(), []).append(p)
    students = [p for p in CONFIG_FILES if is_cell(p) and load(p)["method"]["name"] in ("kd", "hsakd")]
    assert len([p for p in students if load(p)["method"]["name"] == "kd"]) >= 2 * 6 + 2 * 3
    assert len([p for p in students if load(p)["method"]["name"] == "hsakd"]) >= 6 + 1
    for student in students:
        cfg = load(student)
        s_plans = planned.get(student.resolve(), [])
        assert s_plans, rel(student)
        for sp in s_plans:
            splan = plans[sp][0]
            over = splan["overrides"]
            over = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in over)}  # normalised "key=value"
            ckpt = over.get("method.teacher_checkpoint", cfg["method"]["teacher_checkpoint"])
            t = teacher_config(student, ckpt)
            t_plans = [p for p in planned.get(t.resolve(), []) if plans[p][0]["out_root"] == splan["out_root"]]
            assert len(t_plans) == 1 and t_plans[0] != sp, f"{rel(student)} in {sp.name}: teacher plans {t_plans}"
            assert 0 in plans[t_plans[0]][0].get("seeds", [0])
            assert ckpt == f"{splan['out_root']}/{t.stem}/seed0/{teacher_file(student)}"
            want = "ce" if cfg["method"]["name"] == "kd" else "sad_ce"
            assert load(t)["method"]["name"] == want, rel(student)


# ----------------------------------------------------------------------------- recipe
def test_paper_cells_follow_the_paper_recipe():
    cells = [p for p in PAPER.rglob("*.yaml") if is_cell(p) and SELFKD not in p.parents]
    for p in cells:
        cfg = load(p)
        o, t, d = cfg["optim"], cfg["train"], cfg["data"]
        assert (o["name"], o["momentum"], o["schedule"], o["lr_decay"]) == ("sgd", 0.9, "step", 0.1), p
        assert d["augment"]["flip"] and d["train_fraction"] == 1.0, p
        if d["name"] == "folder":  # ImageNet (Table I)
            assert p.parent.name == "table1" and Path(d["root"]).name == "imagenet" and d["image_size"] == 224
            assert (o["lr"], o["weight_decay"], o["milestones"], t["epochs"], t["batch_size"]) == \
                (0.1, 1e-4, [30, 60, 90], 100, 256)
            continue
        want_lr = 0.01 if cfg["model"]["name"] in LR001_MODELS else 0.05
        # The HSAKD comparison cells train on HSAKD's own recipe (its train_teacher_cifar.py):
        # Nesterov momentum and a third lr step at 180; every other cell on the paper's.
        hsakd = p.parent.name in ("hsakd", "hsakd_students")
        steps = [150, 180, 210] if hsakd else [150, 210]
        assert (o["lr"], o["weight_decay"], o["milestones"], o["nesterov"]) == (want_lr, 5e-4, steps, hsakd), p
        assert (t["epochs"], t["batch_size"], d["augment"]["crop_padding"]) == (240, 64, 4), p
        if d["name"] == "cifar100":
            assert (d["root"], d["download"]) == ("data/cifar100", True), p
        else:
            assert d["name"] == "tiny_imagenet" and p.parent.name == "fig5", p


def test_cpu_cells_mirror_the_paper_cells():
    paper = {str(p.relative_to(PAPER)) for p in PAPER.rglob("*.yaml") if is_cell(p)}
    cpu = {str(p.relative_to(CPU_PAPER)) for p in CPU_PAPER.rglob("*.yaml") if is_cell(p)}
    assert cpu == paper - NO_CPU_TWIN
    for r in sorted(cpu):
        pc, cc = load(PAPER / r), load(CPU_PAPER / r)
        d, t, o = cc["data"], cc["train"], cc["optim"]
        assert (d["name"], d["root"]) == ("folder", "../shared/data/cifar100"), r
        assert (o["schedule"], t["progress"]) == ("cosine", False) and t["epochs"] <= 15, r
        assert o["lr"] == (0.01 if cc["model"]["name"] in LR001_MODELS else 0.05), r
        assert o["nesterov"] == pc["optim"]["nesterov"], r
        # same method and method settings (bar the teacher path and the ImageNet store layout)
        pm, cm = dict(pc["method"]), dict(cc["method"])
        for k in ("teacher_checkpoint", "store", "store_topk", "store_on_host"):
            pm.pop(k, None)
            cm.pop(k, None)
        assert pm == cm, r
        assert pc["data"]["augment"]["cutout"] == d["augment"]["cutout"], r
        assert pc["data"]["augment"]["cutmix_prob"] == d["augment"]["cutmix_prob"], r


def test_selfkd_cells_follow_selfkdlib_recipe():
    """Issue 29: the new baselines on Self-KD-Lib's CIFAR-100 ResNet-18 recipe (its main.py)."""
    cells = sorted(SELFKD.glob("*.yaml"))
    rows = {(load(p)["method"]["name"], load(p)["data"]["augment"]["mixup_alpha"],
             load(p)["data"]["augment"]["cutmix_prob"]) for p in cells}
    assert {("ce", 0.0, 0.0), ("ce", 0.4, 0.0), ("ce", 0.0, 1.0), ("sla", 0.0, 0.0), ("zipf_ls", 0.0, 0.0),
            ("dlb", 0.0, 0.0), ("ddgsd", 0.0, 0.0), ("mixskd", 0.0, 0.0)} <= rows
    for p in cells:
        cfg = load(p)
        o, t, d = cfg["optim"], cfg["train"], cfg["data"]
        assert cfg["model"]["name"] == "resnet18_cifar" and (t["epochs"], t["batch_size"]) == (200, 128), p
        assert (o["name"], o["nesterov"], o["momentum"], o["lr"], o["weight_decay"]) == ("sgd", True, 0.9, 0.1, 5e-4), p
        assert (o["schedule"], o["milestones"], o["lr_decay"], o["warmup_epochs"]) == ("step", [100, 150], 0.1, 5), p
        assert (d["name"], d["augment"]["crop_padding"], d["augment"]["flip"]) == ("cifar100", 4, True), p


def test_hsakd_cells_load_on_hsakd_recipe():
    """Issue 18.1b: SAD-CE on HSAKD's recipe beside the paper's, for the HSAKD rows."""
    cells = sorted((PAPER / "hsakd").glob("*.yaml"))
    assert {load(p)["model"]["name"] for p in cells} == {"wrn_40_2", "resnet56", "resnet32x4", "vgg13"}
    for p in cells:
        cfg = load(p)
        o, t = cfg["optim"], cfg["train"]
        assert cfg["method"]["name"] == "sad_ce" and cfg["method"].get("last_branch", "stage") == "stage", p
        assert (o["name"], o["nesterov"], o["momentum"], o["lr"], o["weight_decay"]) == ("sgd", True, 0.9, 0.05, 5e-4)
        assert (o["milestones"], o["lr_decay"], t["epochs"], t["batch_size"]) == ([150, 180, 210], 0.1, 240, 64)
    o = load(cells[0])["optim"]  # epochs 0-based, as HSAKD's bisect_right(milestones, epoch)
    lrs = [trainer.lr_at(o, 240, e, 0, 10) for e in (149, 150, 179, 180, 209, 210)]
    assert lrs == pytest.approx([0.05, 0.005, 0.005, 0.0005, 0.0005, 0.00005])


def test_readme_lists_every_plan_and_paper_anchor():
    text = (CONFIGS / "README.md").read_text()
    for p in PLAN_FILES:
        if p.name != "quickstart_seeds.yaml":
            assert f"configs/sweeps/{p.name}" in text, p.name
    # a few of METHOD.md's reported numbers, one per table
    for number in ("72.45", "91.15", "79.43", "83.16", "73.95", "85.68", "82.63", "78.48"):
        assert number in text, number


# ----------------------------------------------------------------------------- builds
_BUILT: Dict[str, Dict] = {}


def build_key(cfg: Dict, spec) -> str:
    return json.dumps([cfg["model"], cfg["method"], spec[0], list(spec[1]), spec[2]], sort_keys=True)


def fake_teacher_checkpoint(student: Path, cfg: Dict, bundle: DataBundle, tmp: Path) -> Path:
    t = teacher_config(student, cfg["method"]["teacher_checkpoint"])
    path = tmp / f"{t.parent.parent.name}-{t.parent.name}-{t.stem}.pt"
    if not path.exists():
        tcfg = load(t)
        with cheap_builds():
            teacher = build_method(tcfg, bundle)
        torch.save({"config": tcfg, "classes": list(bundle.classes), "input_shape": list(bundle.input_shape),
                    # the backbone, and the branches an HSAKD student reads
                    "method": {k: v for k, v in teacher.state_dict().items() if k.startswith(("backbone.", "aux."))}},
                   path)
    return path


def _build_param(p: Path):
    # Building the full-scale models (up to 150M parameters with branches) dominates this
    # file's time; they run under -m slow, the CPU-scale and other configs always.
    full_scale = (CONFIGS / "paper") in p.parents
    return pytest.param(p, id=str(p.relative_to(CONFIGS)), marks=[pytest.mark.slow] if full_scale else [])


@pytest.mark.parametrize("path", [_build_param(p) for p in CONFIG_FILES])
def test_config_builds_method_and_model(path, tmp_path_factory):
    cfg = load(path)
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg  # what a run writes to config.yaml reloads
    spec = data_spec(cfg, rel(path))
    key = build_key(cfg, spec)
    if key not in _BUILT:
        bundle = fake_bundle(*spec)
        bcfg = copy.deepcopy(cfg)
        if bcfg["method"]["name"] in ("kd", "hsakd"):
            tmp = tmp_path_factory.getbasetemp() / "teachers"
            tmp.mkdir(exist_ok=True)
            bcfg["method"]["teacher_checkpoint"] = str(fake_teacher_checkpoint(path, cfg, bundle, tmp))
        with cheap_builds():
            method = build_method(bcfg, bundle)
        net = method.deploy()
        info = {"deployed_cls": type(net), "classes": net.num_classes,
                "params": count_params(net), "train_params": count_params(method),
                "is_staged": isinstance(net, StagedBackbone)}
        if CPU_PAPER in path.parents and spec[2] == "image":
            info["macs"] = count_macs(net, spec[1])
        _BUILT[key] = info
        del method, net
    info = _BUILT[key]
    assert info["is_staged"] and info["classes"] == spec[0], path
    assert info["train_params"] >= info["params"] > 0
    if cfg["method"]["name"] in ("lsskd", "lsskd_robust", "sad_ce", "byot"):
        if cfg["method"].get("branches", True):
            assert info["train_params"] > info["params"], f"{path}: no auxiliary branches built"
    if CPU_PAPER in path.parents:
        if "macs" not in info:  # the build was shared with a config outside configs/cpu/paper
            with cheap_builds():
                net = build_model(cfg["model"]["name"], spec[0], **cfg["model"]["kwargs"])
            info["macs"] = count_macs(net, spec[1])
        # CPU variants: students/self-distillation cells <= ~85M MACs per 32x32 image, the
        # CE-only Table II teachers <= ~180M (see configs/README.md).
        limit = 180e6 if path.stem.startswith("t2_teacher_") else 85e6
        assert info["macs"] <= limit, f"{rel(path)}: {info['macs'] / 1e6:.0f}M MACs is not CPU scale"
